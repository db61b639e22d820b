"""The deployment files, checked without a Docker engine: Dockerfile, stack.yml, Prometheus.

``docker stack config`` validates the stack as ``docker stack deploy`` would read it,
promtool validates the Prometheus configuration and alert rules, hadolint lints the
Dockerfile, and the YAML itself is checked for the properties high availability needs.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymongo import uri_parser

from tests.conftest import ROOT, MongoWireServer, ServerProcess
from vault.crypto import generate_key
from vault.settings import Settings, all_variables

HEALTHCHECK_PYTHON = (
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
)

# The user each image runs as: a Docker secret mounted into a service is readable by it alone.
SECRET_READERS = {
    "secret-manager": "10001",  # the Dockerfile's non-root user
    "edge": "99",  # haproxy
    "prometheus": "65534",  # nobody
    "mongo1": "999",  # mongodb
    "mongo2": "999",
    "mongo3": "999",
    "mongo-init": "0",  # a one-shot script, as root
}
MEMBERS = ("mongo1", "mongo2", "mongo3")

# What each Docker secret holds, in a form the service's settings accept.
SAMPLE_SECRETS = {
    "master_key": generate_key(),
    "api_keys": "billing:" + "b" * 43,
    "metrics_token": "m" * 43,
    # The form docs/operations.md creates it in, with a password of 64 hex digits.
    "mongo_uri": (
        "mongodb://secret-manager:" + "0f" * 32 + "@mongo1:27017,mongo2:27017,mongo3:27017/"
        "?replicaSet=rs0"
    ),
}


def tool(name: str) -> str:
    """A CLI the checks need; only outside CI may its absence skip a test."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed on this machine")
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """stack.yml as ``docker stack deploy`` would see it (anchors and merges resolved)."""
    result = run(tool("docker"), "stack", "config", "-c", "stack.yml")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def services(stack: dict[str, Any]) -> dict[str, Any]:
    return dict(stack["services"])


def mounted(service: dict[str, Any], source: str) -> dict[str, Any]:
    """The service's mount of the Docker secret ``source``."""
    (secret,) = [s for s in service.get("secrets", []) if s["source"] == source]
    return dict(secret)


@pytest.fixture
def stack_settings(services: dict[str, Any], tmp_path: Path) -> Settings:
    """The settings secret-manager starts with in the stack: its environment as stack.yml
    sets it, each /run/secrets/ file standing in for by a sample of what it must hold."""
    app = services["secret-manager"]
    files = {}
    for secret in app["secrets"]:
        path = tmp_path / secret["target"]
        path.write_text(SAMPLE_SECRETS[secret["source"]] + "\n")
        files[f"/run/secrets/{secret['target']}"] = str(path)
    env = {name: files.get(value, value) for name, value in app["environment"].items()}
    return Settings.from_env(env)


def test_promtool_accepts_the_configuration_and_rules(tmp_path: Path) -> None:
    """The configuration as Prometheus reads it in the stack, its token file present (promtool
    checks that it exists); the shipped file itself for its syntax."""
    promtool = tool("promtool")
    text = (ROOT / "prometheus.yml").read_text()
    token = tmp_path / "metrics_token"
    token.write_text(SAMPLE_SECRETS["metrics_token"] + "\n")
    assert "credentials_file: /run/secrets/metrics_token" in text
    (tmp_path / "prometheus.yml").write_text(text.replace("/run/secrets/metrics_token", str(token)))
    shutil.copy(ROOT / "alert-rules.yml", tmp_path / "alert-rules.yml")  # beside it, as mounted
    for command in (
        ("check", "config", str(tmp_path / "prometheus.yml")),
        ("check", "config", "--syntax-only", "prometheus.yml"),
        ("check", "rules", "alert-rules.yml"),
        ("test", "rules", "tests/deploy/alert-rules.test.yml"),
    ):
        result = run(promtool, *command)
        assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_accepts_the_dockerfile() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_app_service_is_replicated_and_rolls_safely(services: dict[str, Any]) -> None:
    app = services["secret-manager"]
    deploy = app["deploy"]
    assert deploy["replicas"] >= 2
    assert deploy["update_config"]["order"] == "start-first"
    assert deploy["update_config"]["failure_action"] == "rollback"
    assert deploy["rollback_config"]["parallelism"] >= 1
    assert deploy["restart_policy"]["condition"] == "any"
    assert deploy["resources"]["limits"]["memory"]
    assert deploy["resources"]["limits"]["cpus"]
    assert app["healthcheck"]["test"] == ["CMD", "python", "-c", HEALTHCHECK_PYTHON]
    assert "ports" not in app  # reached through the edge only


def test_master_key_comes_from_a_docker_secret(
    stack: dict[str, Any], services: dict[str, Any]
) -> None:
    app = services["secret-manager"]
    env = app["environment"]
    assert "MASTER_KEY" not in env  # an environment variable leaks through docker inspect
    assert env["MASTER_KEY_FILE"] == "/run/secrets/master_key"
    secret = mounted(app, "master_key")
    assert secret["target"] == "master_key"
    assert secret["uid"] == "10001"  # readable by the image's non-root user only
    assert stack["secrets"]["master_key"]["external"] is True


def test_every_secret_is_created_outside_the_file_and_readable_by_its_reader_only(
    stack: dict[str, Any], services: dict[str, Any]
) -> None:
    used = set()
    for name, service in services.items():
        for secret in service.get("secrets", []):
            assert stack["secrets"][secret["source"]]["external"] is True, secret
            assert secret["mode"] == 0o400, (name, secret)
            assert secret["uid"] == secret["gid"] == SECRET_READERS[name], (name, secret)
            used.add(secret["source"])
    assert used == set(stack["secrets"])  # none declared and forgotten


def test_the_service_reads_every_credential_from_a_docker_secret(services: dict[str, Any]) -> None:
    """No secret setting in plain environment (docker inspect shows it), and each *_FILE
    names a setting's file form (no typo silently ignored) and a secret mounted there."""
    app = services["secret-manager"]
    env = app["environment"]
    secret_variables = [variable.name for variable in all_variables() if variable.secret]
    assert not set(secret_variables) & set(env)
    files = {name: path for name, path in env.items() if name.endswith("_FILE")}
    assert set(files) <= {f"{name}_FILE" for name in secret_variables}
    assert {
        "MASTER_KEY_FILE",
        "API_KEYS_FILE",
        "METRICS_TOKEN_FILE",
        "MONGO_URI_FILE",
        "RATE_LIMIT_STORAGE_FILE",
    } <= set(files)
    targets = {f"/run/secrets/{secret['target']}" for secret in app["secrets"]}
    assert set(files.values()) <= targets


def test_the_stack_starts_the_service_closed(stack_settings: Settings) -> None:
    """The stack's environment as the service parses it: API keys and the metrics token on."""
    assert [key.label for key in stack_settings.api_keys] == ["billing"]
    assert stack_settings.metrics_token_digest is not None


def test_every_secret_expires(stack_settings: Settings) -> None:
    """A create that names no ttl lives 30 days, and none lives past 90: whatever a key
    holder stores, forgotten or not, leaves the store by then (docs/operations.md)."""
    assert stack_settings.default_ttl_seconds == 30 * 86400
    assert stack_settings.max_ttl_seconds == 90 * 86400


def test_the_docs_say_how_to_create_every_docker_secret(stack: dict[str, Any]) -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for name in stack["secrets"]:
        assert f"docker secret create {name} " in text, name


def test_mongodb_is_a_three_member_replica_set(
    services: dict[str, Any], stack_settings: Settings
) -> None:
    members = MEMBERS
    volumes = set()
    for name in members:
        member = services[name]
        # 8.0: the client-level bulkWrite that writes a batch of creates in one command.
        assert re.fullmatch(r"mongo:8(\.\d+)*", member["image"])
        assert member["command"][-3:] == ["--replSet", "rs0", "--bind_ip_all"]
        assert "ports" not in member  # never published outside the overlay network
        (volume,) = member["volumes"]
        assert volume["target"] == "/data/db"
        volumes.add(volume["source"])
        assert member["deploy"]["placement"]["constraints"] == [f"node.labels.{name} == true"]
        assert member["healthcheck"]["test"][0] == "CMD"
    assert len(volumes) == 3
    # The URI is a secret now: the one the docs create, as the service reads it.
    uri = documented_mongo_uri()
    assert stack_settings.mongo_uri == uri
    parsed = uri_parser.parse_uri(uri)
    assert parsed["nodelist"] == [(name, 27017) for name in members]
    assert parsed["options"]["replicaSet"] == "rs0"


def documented_mongo_uri() -> str:
    """The mongo_uri secret as docs/operations.md creates it, its random password filled in."""
    text = (ROOT / "docs" / "operations.md").read_text()
    (template,) = re.findall(
        r"printf '(mongodb://[^']*)\\n' \"\$\(openssl rand -hex 32\)\" \\\n"
        r"\s*\| docker secret create mongo_uri -",
        text,
    )
    uri: str = template % ("0f" * 32)
    return uri


def test_mongod_asks_every_client_and_member_to_authenticate(services: dict[str, Any]) -> None:
    keyfiles = set()
    for name in MEMBERS:
        command = services[name]["command"]
        assert "--auth" in command
        keyfile = mounted(services[name], "mongo_keyfile")
        assert command[command.index("--keyFile") + 1] == f"/run/secrets/{keyfile['target']}"
        keyfiles.add(keyfile["source"])
    assert keyfiles == {"mongo_keyfile"}  # one key for the set
    # The administrator is created by mongo1's first start, its password from a secret; the
    # other members start empty, as rs.initiate requires, and copy the users from mongo1.
    env = services["mongo1"]["environment"]
    password = mounted(services["mongo1"], "mongo_root_password")
    assert env["MONGO_INITDB_ROOT_PASSWORD_FILE"] == f"/run/secrets/{password['target']}"
    assert "MONGO_INITDB_ROOT_PASSWORD" not in env
    for name in ("mongo2", "mongo3"):
        assert "environment" not in services[name]
        assert [s["source"] for s in services[name]["secrets"]] == ["mongo_keyfile"]


def test_the_init_job_makes_the_services_user_from_the_services_own_uri(
    services: dict[str, Any],
) -> None:
    """One secret, mongo_uri, holds secret-manager's user and password: the job creates that
    user from it, so the two cannot disagree, with readWrite on MONGO_DB and nothing more."""
    init, app = services["mongo-init"], services["secret-manager"]
    uri_secret = mounted(app, "mongo_uri")
    assert app["environment"]["MONGO_URI_FILE"] == f"/run/secrets/{uri_secret['target']}"
    for source in ("mongo_uri", "mongo_root_password"):
        assert mounted(init, source)["target"] == source  # the script reads /run/secrets/NAME
    assert (
        init["environment"]["MONGO_ROOT_USERNAME"]
        == (services["mongo1"]["environment"]["MONGO_INITDB_ROOT_USERNAME"])
    )
    assert init["environment"]["MONGO_DB"] == app["environment"]["MONGO_DB"]
    script = init["command"][-1]
    assert 'fs.readFileSync("/run/secrets/" + name' in script
    assert 'auth(process.env.MONGO_ROOT_USERNAME, secret("mongo_root_password"))' in script
    assert 'secret("mongo_uri").match(' in script
    assert 'roles = [{role: "readWrite", db: process.env.MONGO_DB}]' in script
    # Idempotent: an existing user gets the secret's password and roles again.
    assert "admin.createUser({user: user, pwd: pwd, roles: roles})" in script
    assert "admin.updateUser(user, {pwd: pwd, roles: roles})" in script
    assert "--password" not in script and " -p " not in script  # never on a command line


def test_replica_set_init_is_one_shot_and_idempotent(services: dict[str, Any]) -> None:
    init = services["mongo-init"]
    assert init["deploy"]["restart_policy"]["condition"] == "on-failure"
    script = init["command"][-1]
    assert "rs.initiate" in script
    assert "NotYetInitialized" in script  # only a fresh set is initiated
    for name in ("mongo1", "mongo2", "mongo3"):
        assert f'host: "{name}:27017"' in script


def test_encrypted_overlay_networks_split_by_who_must_talk(
    stack: dict[str, Any], services: dict[str, Any]
) -> None:
    members = {
        network: {name for name, service in services.items() if network in service["networks"]}
        for network in stack["networks"]
    }
    assert members == {
        "edge": {"edge", "secret-manager"},
        "store": {"secret-manager", "mongo1", "mongo2", "mongo3", "mongo-init"},
        "metrics": {"prometheus", "secret-manager"},
        "edge-metrics": {"prometheus", "edge"},
        "traces": {"otel-collector", "secret-manager"},
    }
    for network in stack["networks"].values():
        assert network["driver"] == "overlay"
        assert network["driver_opts"]["encrypted"] == "true"
    # One shared network at most per pair: Docker's DNS then answers each with the other's
    # address on that network alone (the edge reaches the replicas from its own subnet).
    for first, second in itertools.combinations(services.values(), 2):
        assert len(set(first["networks"]) & set(second["networks"])) <= 1


def test_only_the_edge_network_may_choose_the_audited_address(
    stack: dict[str, Any], services: dict[str, Any], stack_settings: Settings
) -> None:
    """TRUSTED_PROXIES is the edge network's pinned subnet, which only the edge and the
    replicas join: MongoDB, Prometheus or the collector connect from elsewhere, and their
    X-Forwarded-For is ignored."""
    (pool,) = stack["networks"]["edge"]["ipam"]["config"]
    trusted = services["secret-manager"]["environment"]["TRUSTED_PROXIES"]
    assert trusted == pool["subnet"]
    assert ipaddress.ip_network(trusted).is_private
    assert stack_settings.trusted_proxies == (ipaddress.ip_network(trusted),)


def test_the_edge_is_published_on_each_node_and_terminates_tls(
    stack: dict[str, Any], services: dict[str, Any]
) -> None:
    edge = services["edge"]
    assert re.fullmatch(r"haproxy:2\.6\.\d+-alpine", edge["image"])  # CI checks with 2.6
    assert edge["deploy"]["mode"] == "global"
    # Host mode: HAProxy sees the client's address, not the routing mesh's.
    assert sorted((p["published"], p["target"], p["mode"]) for p in edge["ports"]) == [
        (80, 8080, "host"),
        (443, 8443, "host"),
    ]
    text = (ROOT / "haproxy.cfg").read_text()
    assert '"${EDGE_HTTPS_BIND-:8443}"' in text
    assert '"${EDGE_HTTP_BIND-:8080}"' in text
    (config,) = edge["configs"]
    assert config["target"] == "/usr/local/etc/haproxy/haproxy.cfg"  # the image's default
    assert stack["configs"][config["source"]]["file"].endswith("/haproxy.cfg")
    (secret,) = edge["secrets"]
    assert f"/run/secrets/{secret['target']}" == "/run/secrets/edge_tls.pem"
    assert '"${EDGE_TLS_PEM-/run/secrets/edge_tls.pem}"' in text
    assert stack["secrets"][secret["source"]]["external"] is True
    assert secret["uid"] == "99"  # the image's user haproxy, and no one else
    assert "ports" not in services["secret-manager"]
    # Plain HTTP is redirected to the configured public host, never the client's Host.
    assert edge["environment"]["EDGE_PUBLIC_HOST"]
    assert '"${EDGE_PUBLIC_HOST-' in text or "${EDGE_PUBLIC_HOST-" in text


def test_rate_limits_are_per_client_on_the_shared_counters(
    services: dict[str, Any], stack_settings: Settings
) -> None:
    env = services["secret-manager"]["environment"]
    assert env["RATE_LIMIT_STORAGE_FILE"] == env["MONGO_URI_FILE"]  # the same secret
    assert stack_settings.rate_limit_storage == stack_settings.mongo_uri
    assert env["RATE_LIMIT"] not in ("", "off")


def test_monitoring_scrapes_every_replica_and_loads_the_rules(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    targets = {c["source"]: c["target"] for c in prometheus["configs"]}
    assert targets["prometheus_config"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "secret-manager"]
    assert job["dns_sd_configs"] == [
        {"names": ["tasks.secret-manager"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]
    assert "static_configs" not in job  # not the virtual IP
    # /metrics asks for the token: Prometheus reads it from the same Docker secret.
    token_file = services["secret-manager"]["environment"]["METRICS_TOKEN_FILE"]
    (app_token,) = [
        s
        for s in services["secret-manager"]["secrets"]
        if f"/run/secrets/{s['target']}" == token_file
    ]
    own_token = mounted(prometheus, app_token["source"])
    assert job["authorization"] == {"credentials_file": f"/run/secrets/{own_token['target']}"}
    # rule_files is relative to the config file: the rules must be mounted beside it.
    for rule_file in config["rule_files"]:
        assert str(Path("/etc/prometheus") / rule_file) in targets.values()
    rules = yaml.safe_load((ROOT / "alert-rules.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert names == {
        "SecretManagerInstanceDown",
        "SecretManagerNoReplicaUp",
        "SecretManagerHigh5xxRatio",
        "SecretManagerHighP99Latency",
        "SecretManagerAuditWriteFailures",
        "SecretManagerRateLimitSurge",
        "SecretManagerReplicaNotReady",
        "SecretManagerEdgeNoHealthyBackend",
        "SecretManagerUnreadableRecords",
        "SecretManagerWebhookBacklog",
        "SecretManagerWebhookEventsDropped",
    }
    (edge_job,) = [j for j in config["scrape_configs"] if j["job_name"] == "edge"]
    # Each edge task's exporter, on the port haproxy.cfg binds it to.
    assert edge_job["dns_sd_configs"][0]["names"] == ["tasks.edge"]
    assert edge_job["dns_sd_configs"][0]["port"] == 8405
    assert '"${EDGE_METRICS_BIND-:8405}"' in (ROOT / "haproxy.cfg").read_text()


def test_prometheus_is_not_published(services: dict[str, Any]) -> None:
    """Only the edge takes connections from outside the stack: not Prometheus's UI and API
    (no authentication of its own), nor anything else."""
    assert "ports" not in services["prometheus"]
    assert [name for name, service in services.items() if "ports" in service] == ["edge"]


def test_traces_go_to_the_collector(services: dict[str, Any]) -> None:
    env = services["secret-manager"]["environment"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    collector = services["otel-collector"]
    config = yaml.safe_load((ROOT / "otel-collector.yml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert set(config["receivers"]["otlp"]["protocols"]) == {"http"}  # what the service sends
    assert collector["configs"][0]["target"] == "/etc/otelcol/config.yaml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_image_is_multi_stage_pinned_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) >= 2
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE"))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (cmd,) = [arg for op, arg in instructions if op == "CMD"]
    assert shlex.split(cmd)[0].startswith("[")  # exec form
    assert '"secret-manager", "serve", "--host", "0.0.0.0"' in cmd
    assert '"--workers", "1"' in cmd
    (healthcheck,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert HEALTHCHECK_PYTHON in healthcheck
    assert any(op == "COPY" and "pyproject.toml" in arg for op, arg in instructions)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    # Everything out first, then back in only what the build copies: no tests, no .git.
    assert ignored.index("*") < min(i for i, line in enumerate(ignored) if line.startswith("!"))
    assert {line for line in ignored if line.startswith("!")} == {
        "!pyproject.toml",
        "!requirements.lock",
        "!README.md",
        "!vault/",
        "!middleware/",
        "!observability/",
    }


def test_image_installs_the_hash_locked_requirements_and_resolves_nothing() -> None:
    """Every pip install in the image takes no dependencies of its own accord: the lock,
    checked against its hashes, brings them all (tests/test_dependencies.py keeps the lock
    in step with pyproject.toml)."""
    installs = [
        shlex.split(command)
        for op, arg in dockerfile_instructions()
        if op == "RUN"
        for command in arg.split("&&")
        if "pip install" in command
    ]
    locked = [words for words in installs if "requirements.lock" in words]
    assert len(locked) == 1
    assert {"--require-hashes", "--no-deps", "-r"} <= set(locked[0])
    assert all("--no-deps" in words for words in installs)
    copied = [arg.split()[0] for op, arg in dockerfile_instructions() if op == "COPY"]
    assert "requirements.lock" in copied


def test_the_healthcheck_command_follows_readiness(
    start_server: Any, master_key: str, tmp_path: Path
) -> None:
    """The image's HEALTHCHECK, run as is against a real server, with its store up and down."""
    nx = MongoWireServer(tmp_path / "nx")
    (tmp_path / "nx").mkdir()
    nx.start()
    try:
        server: ServerProcess = start_server(
            {"MASTER_KEY": master_key, "MONGO_URI": nx.uri, "STORE_TIMEOUT_SECONDS": "1"}
        )
        check = ["python", "-c", HEALTHCHECK_PYTHON.replace("8000", str(server.port))]
        assert subprocess.run(check, capture_output=True, timeout=10).returncode == 0
        nx.stop()
        assert subprocess.run(check, capture_output=True, timeout=10).returncode != 0
    finally:
        nx.stop()
