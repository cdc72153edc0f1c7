"""The soak (bench/soak.py) in `make test`: five minutes of steady posting
through nginx on three workers, with pages dropping their connection every
second and the workers stopped with SIGTERM one after another and started
again. Every page must end with exactly its room's messages as the database
holds them, every post stored once, and memory, open files, database
connections and Redis memory must level off. Latency is a figure for
docs/reliability.md, never asserted.

It runs 200 pages, as `make soak` does by default; CHAT_SOAK_SECONDS shortens
or lengthens it, and `make soak` runs it for as long as asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

SOAK_SECONDS = float(os.environ.get("CHAT_SOAK_SECONDS", "300"))
# 200 pages in rooms of ten at 2 posts/s: 400 posts/s, 4,000 deliveries/s,
# a production room's scale, on the two cores of CI with the clients and
# every server on them (docs/reliability.md has its figures).
CLIENTS, RATE = 200, 2.0
# Its own process: bench.soak sets Django up for the cluster's database.
COMMAND = [
    sys.executable,
    "-m",
    "bench.soak",
    f"--clients={CLIENTS}",
    f"--rate={RATE}",
    f"--seconds={SOAK_SECONDS}",
    f"--restart-seconds={SOAK_SECONDS / 5}",
]
# How far a figure's peak in the last third of the run may rise above its peak
# in the middle third: (factor, slack). A leak of one socket's worth per drop
# or per restart would pass both thirds' peaks by far more.
PLATEAU = {
    "workers_rss_kib": (1.15, 20_000),
    "workers_open_files": (1.15, 20),
    "database_connections": (1.0, 3),
    "redis_used_memory": (1.5, 2_000_000),
}


# The soak, its cluster's start and stop, and the settling after the posts.
@pytest.mark.hang_seconds(SOAK_SECONDS + 600)
def test_posting_churn_and_rolling_restarts_lose_nothing_and_level_off():
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")
    }
    soak = subprocess.Popen(
        COMMAND,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = soak.communicate(timeout=SOAK_SECONDS + 600)
    except subprocess.TimeoutExpired:
        soak.terminate()  # it stops its cluster on SIGTERM
        stdout, stderr = soak.communicate(timeout=120)
    assert stdout, stderr[-3000:]
    report = json.loads(stdout)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=1))  # shown with the failure, or with -s

    # It was a soak: posts all along, pages moved, workers restarted.
    assert report["posted"] >= 0.9 * CLIENTS * RATE * SOAK_SECONDS
    assert report["drops"] > 0 and report["reconnects"] >= report["drops"]
    assert report["restarts"] >= 2

    # No socket ended in a server failure (the page reconnects after one,
    # but it is a bug all the same).
    assert "1011" not in report["closes"], stderr[-12000:]
    # Nothing acknowledged lost, nothing twice, nothing the database lacks
    # (stderr: the pages left behind, their closes, the workers' logs).
    assert report["unacknowledged"] == 0, stderr[-12000:]
    assert report["stored"] == report["posted"]
    assert report["stored_twice"] == 0
    assert report["missing"] == {}, "pages miss messages the database holds"
    assert report["unexpected"] == {}, "pages hold messages the database does not"
    assert soak.returncode == 0, stderr[-3000:]

    for name, (factor, slack) in PLATEAU.items():
        peaks = report["plateau"][name]
        assert peaks["last_peak"] <= factor * peaks["middle_peak"] + slack, (
            name,
            peaks,
        )
