"""The benchmark suite at a tiny scale: it runs, checks every delivery and reports.

No timing is asserted: only that both servers ran every workload, that the
exactly-once check passed (it makes the exit status non-zero otherwise) and
that the table and the plot were written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_run(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(
        "# Performance\n\nprose before\n\n"
        "<!-- bench:results:start -->\nold\n<!-- bench:results:end -->\n\nprose after\n"
    )
    png = tmp_path / "fanout.png"
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scale",
            "0.005",
            "--rounds",
            "1",
            "--users",
            "12",
            "--client-procs",
            "2",
            "--workloads",
            "g,sweep",
            "--output",
            str(doc),
            "--plot",
            str(png),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in result.stdout, output
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| workload | figure | ours | baseline | ours / baseline |", (
        table
    )
    assert any(line.startswith("| sweep: fan-out") for line in table), table
    assert any(line.startswith("| (g) stuck reader") for line in table), table
    assert png.exists() and png.stat().st_size > 0
