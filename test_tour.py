"""The narrated tour (tour.py) and its document (docs/tour.md).

- docs/tour.md is what ``tour.py --markdown FILE`` writes now: the test
  fails when it is stale, with the difference and the command that
  regenerates it. What changes from run to run is masked, and the
  document holds no time, folder or serial that escaped the mask.
- Every rule the tour cites is an id of SPEC.md.
- ``--pause`` waits for Enter on a terminal; without one it is ignored,
  saying so, rather than hanging.
- Every curl line the tour prints runs as printed against the tour's
  server at the end of its step (when a reader with --pause runs it), and
  gets the answer the tour shows, or the one its label says it gets now.

A run of the tour takes about a second; every wait here is bounded.
"""

from __future__ import annotations

import difflib
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tour

HERE = Path(__file__).resolve().parent
DOCUMENT = HERE / "docs" / "tour.md"
REGENERATE = ".venv/bin/python tour.py --markdown docs/tour.md"
SECONDS = 60  # the longest one run of the tour may take, on a slow machine
SPEC_ID = re.compile(r"^ *- \*\*([A-Z]+-[0-9][0-9.]*(?:-[A-Z0-9-]+)?)\*\*", re.MULTILINE)
CITED = re.compile(r"^- `([A-Z]+-[0-9][^`]*)`:", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    """One run of ``tour.py --pause --markdown FILE`` with no terminal."""

    stdout: str
    stderr: str
    document: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    markdown = tmp_path_factory.mktemp("tour") / "tour.md"
    done = subprocess.run(
        [sys.executable, "tour.py", "--pause", "--markdown", str(markdown)],
        cwd=HERE,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Run(done.stdout, done.stderr, markdown.read_text())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed: the tour skips its last step")
def test_the_document_is_what_the_tour_writes_now(run: Run) -> None:
    current = DOCUMENT.read_text()
    if run.document != current:
        diff = difflib.unified_diff(
            current.splitlines(), run.document.splitlines(), "docs/tour.md", "tour.py now", lineterm="", n=1
        )
        pytest.fail(f"docs/tour.md is stale: regenerate it with `{REGENERATE}`\n" + "\n".join(list(diff)[:60]))


def test_the_document_masks_what_changes_from_run_to_run(run: Run) -> None:
    document = run.document
    assert not tour.TIME.search(document), "a time escaped the mask"
    assert tempfile.gettempdir() + "/tour-" not in document, "the temporary folder escaped the mask"
    assert not re.search(r"\b[0-9a-f]{30,}\b", document), "a serial escaped the mask"
    assert not re.search(r'"pairingId": "[0-9a-f]{6}"', document), "a pairing id escaped the mask"
    assert not re.search(r"127\.0\.0\.1:[0-9]", document), "the port escaped the mask"
    for label in ("<pairing id of sensor-0003>", "<pairing id of agent-0001>", "<serial 3>", "127.0.0.1:<port>"):
        assert label in document


def test_every_rule_the_tour_cites_is_in_the_spec(run: Run) -> None:
    specified = set(SPEC_ID.findall((HERE / "SPEC.md").read_text()))
    cited = set(CITED.findall(run.document))
    assert len(specified) > 50 and len(cited) > 20, "the readers of ids no longer read the documents"
    assert cited <= specified, f"not ids of SPEC.md: {sorted(cited - specified)}"


def test_the_terminal_shows_the_real_server_and_no_masks(run: Run) -> None:
    setup = re.search(
        r"TOUR=(\S+) URL=https://127\.0\.0\.1:(\d+)/api[\s\\]+TOKEN=tour-admin-token-0123456789abcdef", run.stdout
    )
    assert setup, "the transcript does not say where the server runs"
    assert "<time>" not in run.stdout and "<serial" not in run.stdout and "<pairing id" not in run.stdout
    assert "The server has stopped, and its temporary folder is gone." in run.stdout
    assert not Path(setup.group(1)).exists()


def test_pause_without_a_terminal_is_ignored_saying_so(run: Run) -> None:
    assert run.stdout.startswith("--pause is ignored: standard input is not a terminal.")
    assert "[Enter" not in run.stdout


def test_pause_waits_for_enter_on_a_terminal() -> None:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "tour.py", "--pause"], cwd=HERE, stdin=secondary, stdout=secondary, stderr=secondary
    )
    os.close(secondary)
    try:
        before = read_until(primary, "[Enter: the first step]")
        assert "== 1." not in before
        assert read_until(primary, "== 1.", seconds=0.5) == "", "it went on without waiting for Enter"
        os.write(primary, b"\n")
        first = read_until(primary, "[Enter: the next step]")
        assert "== 1. " in first and "== 2." not in first
        os.write(primary, b"\x04")  # Ctrl-D: no more waiting, run to the end
        assert "The server has stopped" in read_until(primary, "temporary folder is gone")
        assert process.wait(SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)


def read_until(descriptor: int, text: str, seconds: float = SECONDS) -> str:
    """What a terminal shows up to and including ``text``; "" when nothing shows it in ``seconds``."""
    seen, deadline = "", time.monotonic() + seconds
    while text not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            return "" if seconds < SECONDS else pytest.fail(f"no {text!r} in {seconds} s; the terminal showed:\n{seen}")
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:  # Linux: EIO once the child has closed the terminal
            chunk = b""
        if not chunk:
            return seen if text in seen else pytest.fail(f"the tour ended without {text!r}:\n{seen}")
        seen += chunk.decode(errors="replace").replace("\r\n", "\n")
    return seen


# --- The curl lines run as printed ----------------------------------------------


class CurlTour(tour.Tour):
    """The tour, with each curl line it prints run again at the end of its step, as a reader with --pause would."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.waiting: list[tuple[str, str | None, bytes, int]] = []  # this step's lines, not yet run
        self.replays: list[tuple[str, int, int]] = []  # each line, the status it got, the status the tour said

    def call(self, who: tour.Identity, method: str, path: str, body: Any = None, **options: Any) -> tour.Answer:
        answer = super().call(who, method, path, body, **options)
        label = self.show.markdown[-1].split(":\n", 1)[0]  # as printed: "Try it", or what it answers now
        said = re.fullmatch(r"Try it(?: \(run now, it answers (\d+): [^)]+\))?", label)
        assert said, label
        words = tour.curl(who, method, path, body, options.get("body_file"), options.get("output"))
        command = "\n".join(tour.wrap_command(words))
        self.waiting.append((command, options.get("output"), answer.body, int(said.group(1) or answer.status)))
        return answer

    def end_of_step(self, prompt: str) -> None:
        """Run this step's curl lines as printed, now that the step is over."""
        environment = os.environ | {"TOUR": str(self.folder), "URL": self.url, "TOKEN": tour.ADMIN_TOKEN}
        for command, output, body, expected in self.waiting:
            done = subprocess.run(
                ["bash", "-c", command + " -w '\\n%{http_code}'"],
                env=environment,
                capture_output=True,
                timeout=SECONDS,
                check=False,
            )
            assert done.returncode == 0, f"{command}\n{done.stderr.decode()}"
            if output:
                assert (self.folder / output).read_bytes() == body, command
            self.replays.append((command, int(done.stdout.rsplit(b"\n", 1)[1]), expected))
        self.waiting.clear()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: apt-get install curl")
def test_every_curl_line_run_after_its_step_gets_the_answer_the_tour_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 26 item 5: with --pause, a line that repeats a decision says that it answers 409 (or 404) now."""
    replaying = CurlTour(tmp_path, tour.Transcript(tour.Masker()))
    try:
        tour.walk(replaying, replaying.end_of_step)
    finally:
        replaying.stop()
    assert len(replaying.replays) > 20
    for command, status, expected in replaying.replays:
        assert status == expected, f"{command}\nanswered {status}, not {expected}"
    printed = capsys.readouterr().out
    assert "Try it (run now, it answers 409: not_pending, the request is approved already):" in printed
    assert "Try it (run now, it answers 404: not_found, the user is gone already):" in printed


# --- The helpers ---------------------------------------------------------------------


def test_the_mask_replaces_whole_values_only() -> None:
    mask = tour.Masker()
    mask.name("abc123", "<pairing id>")
    mask.serial("ff01")
    text = mask('{"pairingId": "abc123", "other": "abc1234", "at": "2026-01-01T12:00:00.000+00:00"} ff01 ff012')
    assert text == '{"pairingId": "<pairing id>", "other": "abc1234", "at": "<time>"} <serial 1> ff012'


def test_json_fits_the_width_where_its_strings_allow() -> None:
    data = {"items": [{"resource": f"sensors/{n:04}/#", "operation": "write", "context": "mqtt"} for n in range(4)]}
    lines = tour.pretty(data)
    assert all(len(line) <= tour.WIDTH - 4 for line in lines)
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == 8
    assert tour.pretty({"short": [1, 2]}) == ['{"short": [1, 2]}']
