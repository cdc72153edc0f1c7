"""Ends a run whose test hangs, saying which test and what it waits on.

pytest's faulthandler_timeout dumps the threads, but a test that hangs in its
event loop's shutdown (a task that ignores its cancel) shows only pytest's own
frames there, and CI keeps only the end of the output. This watch dumps the
threads, then every pending asyncio task with its stack (what the loop waits
on), and last the test's id, then exits 1.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
import time

import pytest

# No test needs this long (the slowest take about a minute).
HANG_SECONDS = float(os.environ.get("CHAT_TEST_HANG_SECONDS", 300))


class HangWatch:
    def __init__(self, limit: float, out) -> None:
        self.limit = limit
        # The terminal's stderr, not the capture that a running test writes to.
        self.out = out
        self.nodeid: str | None = None
        self.since = 0.0
        self._thread = threading.Thread(
            target=self._watch, name="hang-watch", daemon=True
        )
        self._thread.start()

    def begin(self, nodeid: str, limit: float) -> None:
        # The watch reads nodeid first: set it last.
        self.since, self.limit = time.monotonic(), limit
        self.nodeid = nodeid

    def end(self) -> None:
        self.nodeid = None

    def _watch(self) -> None:
        while True:
            time.sleep(1)
            nodeid = self.nodeid
            if nodeid is not None and time.monotonic() - self.since > self.limit:
                self._report(nodeid)
                os._exit(1)

    def _report(self, nodeid: str) -> None:
        out = self.out
        print(f"\n=== hung: {nodeid} (over {self.limit:.0f} s); threads:", file=out)
        faulthandler.dump_traceback(file=out, all_threads=True)
        print("=== pending asyncio tasks:", file=out)
        for task in pending_tasks():
            print(f"--- {task!r}", file=out)
            try:
                for line in awaiting(task):
                    print(f"    {line}", file=out)
            except Exception as error:  # a task that changes under us
                print(f"    (no stack: {error!r})", file=out)
        print(f"=== hung: {nodeid}, over {self.limit:.0f} s", file=out, flush=True)


def pending_tasks() -> list[asyncio.Task]:
    """Every unfinished task of any loop (read from another thread, so from
    the garbage collector's list rather than a loop's own)."""
    try:
        return [
            o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()
        ]
    except Exception:
        return []


def awaiting(task: asyncio.Task) -> list[str]:
    """Where a suspended task waits, outermost first: its coroutine and each
    one it awaits (Task.print_stack shows only the outermost)."""
    lines = []
    awaited = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(
            awaited, "gi_yieldfrom", None
        )
    return lines


_watch: HangWatch | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watch
    if HANG_SECONDS > 0:
        # Taken as pytest's faulthandler plugin takes it: capturing is not on yet.
        out = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        _watch = HangWatch(HANG_SECONDS, out)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    # Setup, call and teardown: a hang in a fixture's teardown counts too.
    if _watch is not None:
        # A test that is long on purpose (a soak) says how long it may take.
        marker = item.get_closest_marker("hang_seconds")
        _watch.begin(item.nodeid, marker.args[0] if marker else HANG_SECONDS)
    try:
        return (yield)
    finally:
        if _watch is not None:
            _watch.end()
