"""SPEC.md's closing table with a last column, "proved by": the tests that cite each requirement.

Usage::

    python3 tools/spec_proofs.py           # print the table
    python3 tools/spec_proofs.py --write   # write it at the end of SPEC.md

For maintainers and CI, not for users. A test *cites* a requirement id when
the docstring of its function, or of the class it is a method of, names it
(the house style is a first line such as ``Proves REG-2.4-USER: ...``).
Test functions are found with ``ast``, never imported, so a parametrized
test counts once. The table is the kit's (``conformance.table()``: the id,
its strength, the kit's checks) plus this column; a MUST that no test cites
says why none can in ``NO_PROOF`` below, and test_docs.py fails when SPEC.md's
table is not what this script writes.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import conformance  # noqa: E402  (found through ROOT, which the line above puts on the path)

SPEC = ROOT / "SPEC.md"
AREAS = "REQ|REG|LOCK|ADMIN|AUTH|CERT|STORE|SAFE|TLS|LIFE|HTTP|CLIENT|EST|BROKER"
CITED = re.compile(rf"\b((?:{AREAS})-[0-9][0-9.]*(?:-[A-Z0-9]+)*)\b")
HEADER = "| requirement | strength |"

# Why no test of this repository can prove a MUST (none today: every MUST has a test that cites it).
NO_PROOF: dict[str, str] = {}


def tests_and_docstrings(path: Path) -> dict[str, str]:
    """Each test of a test file, as ``Class::test`` or ``test``, and its docstring joined to its class's."""
    tests = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
            tests[node.name] = ast.get_docstring(node) or ""
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            outer = ast.get_docstring(node) or ""
            for method in node.body:
                if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef) and method.name.startswith("test_"):
                    tests[f"{node.name}::{method.name}"] = f"{outer}\n{ast.get_docstring(method) or ''}"
    return tests


def citations(folder: Path = ROOT) -> dict[str, list[str]]:
    """Every id cited by a test of ``folder``'s ``test_*.py``, and the tests that cite it (``file::test``)."""
    cited: dict[str, list[str]] = {}
    for path in sorted(folder.glob("test_*.py")):
        for test, docstring in tests_and_docstrings(path).items():
            for requirement in dict.fromkeys(CITED.findall(docstring)):
                cited.setdefault(requirement, []).append(f"{path.name}::{test}")
    return cited


def proved_by(tests: list[str]) -> str:
    """The cell of one requirement: its tests grouped by file, ``file.py``: ``test``, ``test``."""
    files: dict[str, list[str]] = {}
    for test in tests:
        name, function = test.split("::", 1)
        files.setdefault(name, []).append(f"`{function}`")
    return "; ".join(f"{name}: {', '.join(functions)}" for name, functions in files.items())


def table(kit_table: str, cited: dict[str, list[str]]) -> str:
    """The kit's table with a last column: per id, the tests that cite it, or why a MUST has none."""
    head, rule, *rows = kit_table.splitlines()
    lines = [f"{head} proved by (this repository's tests) |", f"{rule}---|"]
    for row in rows:
        requirement, strength = (cell.strip() for cell in row.split("|")[1:3])
        if requirement in cited:
            cell = proved_by(cited[requirement])
        elif strength == "MUST":
            cell = NO_PROOF.get(requirement, "**none**")
        else:
            cell = "none"
        lines.append(f"{row} {cell} |")
    return "\n".join(lines)


def unproved(cited: dict[str, list[str]]) -> list[str]:
    """The MUSTs that no test cites and ``NO_PROOF`` does not excuse."""
    return [
        requirement
        for requirement, (strength, _, _) in conformance.REQUIREMENTS.items()
        if strength == "MUST" and requirement not in cited and requirement not in NO_PROOF
    ]


def spec_table(text: str) -> str:
    """The table SPEC.md ends with: from its header line to the end."""
    return text[text.rindex(f"\n{HEADER}") + 1 :].rstrip()


def written(text: str, new_table: str) -> str:
    """SPEC.md's text with its closing table replaced by ``new_table``."""
    return text[: text.rindex(f"\n{HEADER}") + 1] + new_table + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into SPEC.md; list the MUSTs without a proof on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--write", action="store_true", help="replace SPEC.md's closing table")
    arguments = parser.parse_args(argv)
    cited = citations()
    new_table = table(conformance.table(), cited)
    if arguments.write:
        SPEC.write_text(written(SPEC.read_text(), new_table))
    else:
        print(new_table)
    for requirement in unproved(cited):
        print(f"no test cites {requirement}, and NO_PROOF says nothing of it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
