# secret-manager: one Hypercorn worker per container; scale with Swarm replicas.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Every package, the build backend included, at the version and hashes requirements.lock
# pins (made from pyproject.toml by the command in its header): nothing is resolved here,
# and a file whose hash differs stops the build. The image's own pip is enough for that.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY vault ./vault
COPY middleware ./middleware
COPY observability ./observability
# The project itself, built with the locked setuptools; pip check fails the build if the
# lock ever misses a dependency.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 vault \
    && useradd --system --uid 10001 --gid vault --no-create-home \
       --home-dir /var/lib/secret-manager --shell /usr/sbin/nologin vault \
    && install -d -o vault -g vault -m 0700 /var/lib/secret-manager
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/var/lib/secret-manager
WORKDIR /var/lib/secret-manager
USER 10001:10001
EXPOSE 8000
# Only what the image has: Python's urllib. A 503 from /readyz raises, so the check fails.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["secret-manager", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
