"""bench.py works: one smoke run that must measure everything (no timed assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLLS = ("requests_per_second", "p50_ms", "p99_ms", "requests", "seconds")
# Every measurement of the issue, and the numbers each must carry.
MEASUREMENTS = {
    "a_http": POLLS,
    "b_http": POLLS,
    "c_http": POLLS,
    "a_https": POLLS,
    "b_https": POLLS,
    "d_small": (*POLLS, "users", "pending"),
    "d_large": (*POLLS, "users", "pending"),
    "e_server": ("approvals_per_second", "approvals", "seconds"),
    "f": ("peak_rss_mb", "users"),
    "g_idle": ("p50_ms", "p99_ms", "calls"),
    "g_guesses": ("p50_ms", "p99_ms", "calls"),
}


def test_quick_run_measures_every_target(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "bench.py", "--quick", "--json", str(output)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    measurements = report["measurements"]
    assert set(measurements) == set(MEASUREMENTS)
    for key, numbers in MEASUREMENTS.items():
        for name in numbers:
            assert measurements[key][name] > 0, f"{key}.{name} is {measurements[key][name]}"
    # The CPU shares: the client's clock (process_time) is fine enough to see
    # every run; the server's counts clock ticks, which one short run may not
    # see, but the runs together do.
    loads = ("a_http", "b_http", "c_http", "a_https", "b_https", "d_small", "d_large")
    for key in loads:
        for side in ("server_cpu", "client_cpu"):
            share = measurements[key][side]
            assert isinstance(share, float) and math.isfinite(share) and share >= 0, f"{key}.{side} is {share!r}"
        assert measurements[key]["client_cpu"] > 0, f"{key}.client_cpu is 0"
    assert sum(measurements[key]["server_cpu"] for key in loads) > 0
    # e) is reported without a bound: the targets are the polls' and the memory's.
    assert "approvals/s" in run.stdout
    targets = report["targets"]
    assert len(targets) == 6
    assert not any("approv" in target["name"] for target in targets)
    assert all(target["value"] > 0 and isinstance(target["pass"], bool) for target in targets)
    for target in targets:
        assert target["name"] in run.stdout
