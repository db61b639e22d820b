"""Every relative link and ``#anchor`` in README.md, SECURITY.md and docs/*.md resolves.

A newcomer finds the page for any task in one click from the README, so a link that points
at a moved file or a renamed heading is a defect. Anchors follow GitHub's heading slugs:
lower case, spaces to ``-``, punctuation other than ``-`` and ``_`` dropped, and repeated
headings numbered ``-1``, ``-2``, ... External links (any ``scheme:``) are not fetched.
Links inside fenced code blocks and inline code are not links, and are skipped.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A closing fence: the opening's character, at least as many, and nothing after them.
_FENCE_CLOSE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](src); the text may hold one level of brackets.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+[\"'(][^)]*)?\)"
)
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HTML_TAG = re.compile(r"<[^>]+>")


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading's text (github-slugger, before de-duplication)."""
    text = _HTML_TAG.sub("", heading.strip())
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text only
    text = text.lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ " or _is_mark(c))
    return text.replace(" ", "-")


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def anchors(text: str) -> set[str]:
    """Every anchor a Markdown file's headings give it, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _prose_lines(text):
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug = slugify(match.group(2))
        while slug in seen:
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        seen[slug] = 0
        result.add(slug)
    return result


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            lines.append((number, line))
        elif (close := _FENCE_CLOSE.match(line)) and close.group(1).startswith(fence):
            fence = None
    return lines


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found: list[tuple[int, str]] = []
    for number, line in _prose_lines(text):
        prose = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in _INLINE_LINK.finditer(prose)]
        definition = _REFERENCE_DEF.match(prose)
        if definition:
            targets.append(definition.group(1))
        found += [(number, target.strip("<>")) for target in targets]
    return found


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: ({self.target}) {self.reason}"


def doc_files(root: Path) -> list[Path]:
    """The files the check covers: README.md, SECURITY.md and docs/*.md, those that exist."""
    files = [root / "README.md", root / "SECURITY.md", *sorted((root / "docs").glob("*.md"))]
    return [path for path in files if path.is_file()]


def check_links(root: Path) -> list[Problem]:
    """Every relative link or anchor in the docs under ``root`` that does not resolve."""
    problems: list[Problem] = []
    anchor_cache: dict[Path, set[str]] = {}
    for source in doc_files(root):
        name = source.relative_to(root).as_posix()
        for line, target in links(source.read_text(encoding="utf-8")):
            if not target or _SCHEME.match(target):
                continue  # external (http, https, mailto, ...): not fetched here
            path_part, _, fragment = target.partition("#")
            path_part = urllib.parse.unquote(path_part.split("?", 1)[0])
            if not path_part:
                destination = source
            elif path_part.startswith("/"):
                destination = root / path_part.lstrip("/")
            else:
                destination = source.parent / path_part
            if not destination.exists():
                problems.append(Problem(name, line, target, "no such file"))
                continue
            if not fragment or destination.suffix.lower() != ".md":
                continue  # anchors of code files (#L10) are GitHub's line numbers
            resolved = destination.resolve()
            if resolved not in anchor_cache:
                anchor_cache[resolved] = anchors(resolved.read_text(encoding="utf-8"))
            if urllib.parse.unquote(fragment) not in anchor_cache[resolved]:
                problems.append(Problem(name, line, target, "no heading has this anchor"))
    return problems


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    problems = check_links(ROOT)
    assert not problems, "broken links:\n" + "\n".join(map(str, problems))


def test_the_check_covers_the_readme_security_and_every_docs_page() -> None:
    checked = {path.relative_to(ROOT).as_posix() for path in doc_files(ROOT)}
    pages = ("api", "configuration", "operations", "load-testing", "performance", "architecture")
    assert {"README.md", "SECURITY.md", *(f"docs/{page}.md" for page in pages)} <= checked


def test_the_readme_links_every_docs_page() -> None:
    """One click from the front door to the page for any task."""
    targets = {target.partition("#")[0] for _, target in links((ROOT / "README.md").read_text())}
    pages = {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")}
    assert pages - targets == set()


def test_the_checker_reports_a_broken_link_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Setup\n\n## Setup\n\n```sh\n# not a heading\n```\n\n## `MAX_BYTES` (bytes)\n"
    )
    (tmp_path / "code.py").write_text("")
    (tmp_path / "README.md").write_text(
        "# Readme\n"
        "[ok](docs/page.md) [ok](docs/page.md#setup) [ok](docs/page.md#setup-1)\n"
        "[ok](docs/page.md#max_bytes-bytes) [ok](#readme) [ok](code.py#L3) [ok](./docs/)\n"
        "[ok](https://example.com/missing.md#nowhere) [ok](mailto:security@example.com)\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[not a link](nowhere.md)\n```\n"
        "[missing file](docs/missing.md)\n"
        "[missing anchor](docs/page.md#setup-2)\n"
        "[heading inside code is no anchor](docs/page.md#not-a-heading)\n"
        "[missing own anchor](#nowhere)\n"
        "[reference]: docs/gone.md\n"
    )
    found = {(p.file, p.line, p.target, p.reason) for p in check_links(tmp_path)}
    assert found == {
        ("README.md", 9, "docs/missing.md", "no such file"),
        ("README.md", 10, "docs/page.md#setup-2", "no heading has this anchor"),
        ("README.md", 11, "docs/page.md#not-a-heading", "no heading has this anchor"),
        ("README.md", 12, "#nowhere", "no heading has this anchor"),
        ("README.md", 13, "docs/gone.md", "no such file"),
    }


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Running on Docker Swarm", "running-on-docker-swarm"),
        ("`MAX_SECRET_BYTES` and you", "max_secret_bytes-and-you"),
        ("What it does / does not", "what-it-does--does-not"),
        ("API keys (optional), v2.0!", "api-keys-optional-v20"),
        ("Rate-limit: 100/s", "rate-limit-100s"),
        ("[Linked](https://example.com) heading", "linked-heading"),
        ("Café au lait", "café-au-lait"),
    ],
)
def test_slugs_follow_githubs_rules(heading: str, slug: str) -> None:
    assert slugify(heading) == slug


def test_repeated_headings_are_numbered() -> None:
    assert anchors("# Setup\n## Setup\n### Setup\n## Setup-1\n") == {
        "setup",
        "setup-1",
        "setup-2",
        "setup-1-1",
    }


def documented_settings(page: str) -> dict[str, str]:
    """docs/configuration.md's settings table: each variable a row names in its first cell,
    with that row's Default cell."""
    section = page.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names, default, _ = line.removeprefix("| ").split(" | ", 2)
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", names):
            rows[name] = default.strip()
    return rows


# Documented, but read by the OpenTelemetry SDK itself, not by vault/settings/.
READ_BY_LIBRARIES = {"OTEL_EXPORTER_OTLP_ENDPOINT"}


def settings_table_differences(page: str) -> list[str]:
    """Where the docs' settings table and vault/settings/'s table of variables disagree:
    a variable (or its ``*_FILE`` form) missing on either side, or a different default.
    A default stated in the code is the docs cell's leading `code`; no default (unset, or
    derived from another setting) is a cell that says so in words."""
    from vault.settings import all_variables

    rows = documented_settings(page)
    problems = []
    names = set(READ_BY_LIBRARIES)
    for variable in all_variables():
        forms = [variable.name] + ([f"{variable.name}_FILE"] if variable.secret else [])
        names.update(forms)
        for name in forms:
            if name not in rows:
                problems.append(f"{name} has no row")
                continue
            cell = rows[name]
            if variable.default is None and cell.startswith("`"):
                problems.append(f"{name}: the docs state a default {cell!r}, the code has none")
            if variable.default is not None and not cell.startswith(f"`{variable.default}`"):
                problems.append(
                    f"{name}: default `{variable.default}` in the code, {cell!r} in the docs"
                )
    problems += [f"{name} is documented but not read" for name in sorted(rows.keys() - names)]
    return problems


def test_every_setting_is_in_the_settings_table() -> None:
    """A variable vault/settings/ reads and docs/configuration.md does not name is a
    setting nobody can find."""
    from vault.settings import all_variables

    read = {variable.name for variable in all_variables()}
    assert {"MASTER_KEY", "SECRET_MAX_TTL_SECONDS", "SECRET_MANAGER_URL"} <= read  # the walk
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert {name for name in read if f"`{name}`" not in table} == set()


def test_the_settings_table_matches_the_code() -> None:
    """Names, ``*_FILE`` forms and defaults: the docs' table is the code's, row for row."""
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert len(documented_settings(page)) > 40  # the walk: every row was read
    assert settings_table_differences(page) == []


def test_the_settings_check_reports_a_wrong_default_and_a_stray_row() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    wrong = page.replace("| `STORE_TIMEOUT_SECONDS` | `4` |", "| `STORE_TIMEOUT_SECONDS` | `5` |")
    stray = page.replace("| `LOG_LEVEL` |", "| `LOG_LEVEL`, `LOG_FORMAT` |")
    missing = page.replace("`METRICS_TOKEN`, `METRICS_TOKEN_FILE` |", "`METRICS_TOKEN` |")
    assert settings_table_differences(wrong) == [
        "STORE_TIMEOUT_SECONDS: default `4` in the code, '`5`' in the docs"
    ]
    assert settings_table_differences(stray) == ["LOG_FORMAT is documented but not read"]
    assert settings_table_differences(missing) == ["METRICS_TOKEN_FILE has no row"]


def test_the_settings_that_refuse_an_empty_value_are_the_ones_listed() -> None:
    from vault.settings import all_variables

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    sentence = page.split("except these, which refuse it", 1)[1].split(".", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", sentence))
    assert listed == {v.name for v in all_variables() if not v.blank_is_default}
    assert "MASTER_KEY" in listed  # the walk


def test_every_metric_is_in_the_metrics_table() -> None:
    """Each series observability/metrics.py defines has its row in docs/operations.md."""
    from prometheus_client.metrics import MetricWrapperBase

    import observability.metrics as metrics

    names = {
        metric._name + ("_total" if metric._type == "counter" else "")
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }
    assert {"vault_secrets_deleted_total", "http_request_duration_seconds"} <= names  # the walk
    table = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert {name for name in names if f"| `{name}` |" not in table} == set()
