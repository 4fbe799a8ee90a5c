"""Test helper: run a function in a forked process and SIGKILL it at the moment it signals that it paused.

The runio write protocol pauses at named points when RUNIO_PAUSE=point:flagfile is set (it touches the flag file and
sleeps), so a test can kill a writer exactly there and then check what a reader finds.

Run: used by tests/test_runio.py and tests/test_bad_inputs.py
"""

import multiprocessing
import os
import signal
import time
from pathlib import Path


def kill_when_paused(child, flag: Path, what: str, timeout: float = 120.0) -> None:
    """Fork, run `child()`, wait until `flag` exists (the child paused), SIGKILL it and check that the kill ended it."""
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    deadline = time.monotonic() + timeout
    while not flag.exists():
        assert proc.exitcode is None, f"the process ended without reaching {what}"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:g} s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
