"""The documentation as an executable spec: the README's size, its links, its diagram and its Python.

- README.md stays short (at most 300 lines), for a newcomer; the rest lives
  in ``docs/``.
- No Markdown link in README.md, SPEC.md or ``docs/*.md`` leaves the
  repository, and every relative link names a file that exists.
- The README's state diagram is generated from ``registry.TRANSITIONS``:
  the test fails when the table and the diagram differ.
- The README's API table names every route of ``server.ROUTES``, and no other;
  its Settings name every flag of ``server.py --help`` and every field of
  ``registry.Settings``.
- Each requirement of SPEC.md has one id and a strength, and every id that
  the code, the docs or the tests cite is one of them.
- SPEC.md's table is what ``tools/spec_proofs.py`` writes: its last column
  names the tests that cite each id, and every MUST has one or says why not.
- The README's Python examples (the ```python blocks of "Embedding
  `registry.py`") run as printed, in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import conformance
import registry
import server

HERE = Path(__file__).resolve().parent
# tools/ is not a package, and spec_proofs is not for users: load it from its file.
_loader = importlib.util.spec_from_file_location("spec_proofs", HERE / "tools" / "spec_proofs.py")
spec_proofs = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(spec_proofs)

README = HERE / "README.md"
DESIGN = HERE / "docs" / "design.md"
MAX_README_LINES = 300

# [text](target) and ![alt](target); the target ends at white space or ")".
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# <https://...> autolinks.
AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
LOCAL_URL = re.compile(r"^https?://(localhost|127\.0\.0\.1)(:\d+)?(/|$)")


def documents() -> list[Path]:
    """The Markdown pages of the repository: README.md, SPEC.md and docs/."""
    return [README, HERE / "SPEC.md", *sorted((HERE / "docs").glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The text under ``## heading``, up to the next heading of level 2."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of ``text``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def state_diagram(transitions: dict[tuple[registry.State, registry.Event], registry.State | None]) -> str:
    """The Mermaid state diagram of a transition table: one line an entry, ``[*]`` for gone."""
    lines = ["stateDiagram-v2"]
    for (state, event), after in transitions.items():
        source = "[*]" if state is None else state.value
        target = "[*]" if after is None else after.value
        lines.append(f"    {source} --> {target} : {event.name.lower()}")
    return "\n".join(lines) + "\n"


def test_the_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.relative_to(HERE).as_posix())
def test_every_link_stays_in_the_repository(document: Path) -> None:
    text = document.read_text()
    targets = MARKDOWN_LINK.findall(text) + AUTOLINK.findall(text)
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
            assert LOCAL_URL.match(target), f"{document.name} links outside the repository: {target}"
            continue
        path = target.split("#", 1)[0]
        if not path:
            continue  # a link to a heading of the same page
        resolved = (document.parent / path).resolve()
        assert resolved.is_relative_to(HERE), f"{document.name} links outside the repository: {target}"
        assert resolved.exists(), f"{document.name} links to {target}, which does not exist"


def test_the_link_check_sees_what_leaves() -> None:
    text = "[a](../shared/SPEC.md) ![b](docs/x.png) <https://example.org/> [c](http://localhost:8443/)"
    found = MARKDOWN_LINK.findall(text) + AUTOLINK.findall(text)
    assert found == ["../shared/SPEC.md", "docs/x.png", "http://localhost:8443/", "https://example.org/"]
    assert not LOCAL_URL.match("https://example.org/") and LOCAL_URL.match("https://localhost:8443/")


def test_the_state_diagram_is_the_transition_table() -> None:
    [printed] = fenced(section(DESIGN.read_text(), "The life of a request, and the rules layer"), "mermaid")
    assert printed == state_diagram(registry.TRANSITIONS), (
        "docs/design.md's diagram and registry.TRANSITIONS differ; the diagram should read:\n"
        + state_diagram(registry.TRANSITIONS)
    )


def test_the_diagram_shows_every_move_and_only_those() -> None:
    table = {
        (None, registry.Event.REQUEST): registry.State.PENDING,
        (registry.State.PENDING, registry.Event.APPROVE): registry.State.APPROVED,
    }
    assert state_diagram(table) == (
        "stateDiagram-v2\n    [*] --> pending : request\n    pending --> approved : approve\n"
    )
    assert state_diagram(table) != state_diagram(registry.TRANSITIONS)


def documented_routes(text: str) -> set[tuple[str, str]]:
    """(method, path) of each call in the first column of a Markdown table; a bare path takes the method before it."""
    routes = set()
    for row in re.findall(r"^\| *(`[^|]*)\|", text, flags=re.MULTILINE):
        method = ""
        for named, path in re.findall(r"`(?:([A-Z]+) )?(/[^`?]*)", row):
            method = named or method
            routes.add((method, path))
    return routes


def test_the_api_table_is_the_route_table() -> None:
    documented = documented_routes(section(README.read_text(), "The API"))
    served = {(route.method, route.pattern) for route in server.ROUTES}
    assert documented == served, f"only in the README: {documented - served}; only served: {served - documented}"


def test_the_route_reader_carries_the_method() -> None:
    table = "| call | who |\n|---|---|\n| `GET /`, `/admin` | anyone |\n| `DELETE /api/users/{username}` | x |\n"
    assert documented_routes(table) == {("GET", "/"), ("GET", "/admin"), ("DELETE", "/api/users/{username}")}


def test_the_settings_are_the_flags_and_fields() -> None:
    settings = section(README.read_text(), "Settings")
    printed = subprocess.run(
        [sys.executable, "server.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout
    served = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", printed)) - {"--help"}
    documented = set(re.findall(r"`(--[a-z][a-z-]+)", settings))
    assert documented == served, f"only in the README: {documented - served}; only served: {served - documented}"
    fields = {field.name for field in dataclasses.fields(registry.Settings)}
    missing = {name for name in fields if f"`{name}`" not in settings}
    assert not missing, f"registry.Settings fields the README does not name: {missing}"


REQUIREMENT = re.compile(r"^\s*- \*\*([A-Z]+-[0-9][0-9.]*(?:-[A-Z0-9]+)*)\*\* \((MUST|SHOULD)\b", re.MULTILINE)
CITED = spec_proofs.CITED  # a cited id, in any of SPEC.md's areas: one pattern, tools/spec_proofs.py's


def test_each_requirement_has_one_id_and_a_strength() -> None:
    text = (HERE / "SPEC.md").read_text()
    ids = [found.group(1) for found in REQUIREMENT.finditer(text)]
    assert len(ids) == len(set(ids)), f"ids used twice: {sorted({i for i in ids if ids.count(i) > 1})}"
    stated = set(re.findall(r"\*\*([A-Z]+-[0-9][^*]*)\*\*", text))
    assert stated == set(ids), f"ids without a strength: {sorted(stated - set(ids))}"


def test_every_cited_requirement_exists() -> None:
    """A citation names a requirement by its id, or by the start of one (its area and section)."""
    ids = {found.group(1) for found in REQUIREMENT.finditer((HERE / "SPEC.md").read_text())}
    known = ids | {prefix for name in ids for prefix in re.findall(r"^[A-Z]+-[0-9][0-9.]*(?=-)", name)}
    sources = [path for path in [*HERE.glob("*.py"), *HERE.glob("tools/*.py")] if not path.name.startswith("test_")]
    for path in [*sources, *documents()]:
        unknown = set(CITED.findall(path.read_text())) - known
        assert not unknown, f"{path.name} cites requirements that SPEC.md does not have: {sorted(unknown)}"


def test_every_id_a_test_cites_is_a_requirement() -> None:
    """A test proves whole requirements: it cites each by its full id, not by the start of one."""
    ids = {found.group(1) for found in REQUIREMENT.finditer((HERE / "SPEC.md").read_text())}
    unknown = {
        requirement: tests for requirement, tests in spec_proofs.citations(HERE).items() if requirement not in ids
    }
    assert not unknown, f"tests cite ids that SPEC.md does not have: {unknown}"


def test_the_spec_table_names_the_tests_that_prove_each_id() -> None:
    expected = spec_proofs.table(conformance.table(), spec_proofs.citations(HERE))
    assert spec_proofs.spec_table((HERE / "SPEC.md").read_text()) == expected, (
        "SPEC.md's table is stale: run python3 tools/spec_proofs.py --write"
    )


def test_every_must_has_a_proving_test_or_says_why_not() -> None:
    assert spec_proofs.unproved(spec_proofs.citations(HERE)) == []
    assert all(spec_proofs.NO_PROOF.values()), "a reason in NO_PROOF is empty"


def test_a_test_cites_by_its_docstring_or_its_class_s(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        '"""Proves REG-2.4-USER for the module: not a citation of its tests."""\n'
        "import pytest\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_a(n):\n"
        '    """Proves REG-2.4-USER, REG-2.4-REDELIVER: both."""\n'
        "def test_b():\n"
        "    name = 'REG-2.4-USER'  # in the code, not the docstring\n"
        "class TestLock:\n"
        '    """Proves LOCK-3.3."""\n'
        "    def test_c(self):\n"
        '        """And LOCK-3.2."""\n'
        "def helper():\n"
        '    """Proves LOCK-3.1."""\n'
    )
    assert spec_proofs.citations(tmp_path) == {
        "REG-2.4-USER": ["test_x.py::test_a"],
        "REG-2.4-REDELIVER": ["test_x.py::test_a"],
        "LOCK-3.3": ["test_x.py::TestLock::test_c"],
        "LOCK-3.2": ["test_x.py::TestLock::test_c"],
    }
    assert spec_proofs.proved_by(["a.py::test_a", "a.py::test_b", "b.py::test_c"]) == (
        "a.py: `test_a`, `test_b`; b.py: `test_c`"
    )


def embedding_examples() -> list[str]:
    """The README's ```python blocks under "Embedding `registry.py`", each padded to its line in README.md."""
    text = README.read_text()
    blocks = fenced(section(text, "Embedding `registry.py`"), "python")
    design = DESIGN.read_text()
    blocks += fenced(section(design, "The life of a request, and the rules layer"), "python")
    assert len(blocks) == 2, "the embedding examples changed: update this test with them"
    # Blank lines before each block, so that a traceback names its document's own line numbers.
    padded = []
    for block in blocks:
        document = text if block in text else design
        padded.append("\n" * document[: document.index(block)].count("\n") + block)
    return padded


def run_example(source: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a README example as a script of its own, in ``folder``."""
    monkeypatch.chdir(folder)
    exec(compile(source, str(README), "exec"), {"__name__": "__main__"})


def test_the_complete_embedding_example_runs_again_and_keeps_its_secrets_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 26 item 7: a second run in the same folder works too; the database of password hashes is 0600."""
    complete, _ = embedding_examples()
    umask = os.umask(0o022)  # a usual umask, whatever the test runner's
    try:
        for _ in range(2):
            run_example(complete, tmp_path, monkeypatch)
            printed = capsys.readouterr().out.splitlines()
            assert printed[0].startswith("202 {'Retry-After': '5'} {'status': 'pending'")
            assert printed[1].startswith("201 Identity(") and printed[2].startswith("409 username_taken ")
    finally:
        os.umask(umask)
    for name in ("registry.db", "registry.db-wal", "registry.db-shm", "ca.key"):
        assert not (tmp_path / name).exists() or os.stat(tmp_path / name).st_mode & 0o077 == 0, name
    assert (tmp_path / "registry.db").exists()


def test_the_rules_layer_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, rules = embedding_examples()
    run_example(rules, tmp_path, monkeypatch)


def shell_commands(text: str) -> list[str]:
    """The commands of the ```sh blocks of ``text``, each on one line (continuations joined), comments dropped."""
    joined = "\n".join(fenced(text, "sh")).replace("\\\n", " ")
    return [line.split("  # ", 1)[0] for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_a_curl_whose_answer_goes_to_a_pipe_or_a_file_is_silent() -> None:
    """Issue 26 item 9: without -s, curl draws its progress meter over the terminal when its output goes elsewhere."""
    curls = [command for command in shell_commands(README.read_text()) if command.startswith("curl ")]
    redirected = [command for command in curls if re.search(r"\s(\||>)\s", command)]
    assert len(redirected) >= 2, "the README's curl examples changed: update this test with them"
    assert [command for command in redirected if not re.search(r"\s-s(S)?\s", command)] == []


def test_a_curl_that_prints_json_ends_it_with_a_new_line() -> None:
    """Issue 26 item 9: the server's JSON has no final new line, and the prompt would stick to it."""
    curls = [command for command in shell_commands(README.read_text()) if command.startswith("curl ")]
    printing = [command for command in curls if not re.search(r"\s(\||>)\s", command)]
    assert len(printing) >= 9, "the README's curl examples changed: update this test with them"
    assert [command for command in printing if "-w '\\n'" not in command] == []
