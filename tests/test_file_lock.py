"""The one-writer lock (ctl_jax/file_lock.py): refusal naming the holder, waiting, release on
kill, removal on a clean exit, and no two holders when a holder removes the file."""

import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from ctl_jax.file_lock import LockHeld, exclusive_lock

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLD = (
    "import sys, time\n"
    "from ctl_jax.file_lock import exclusive_lock\n"
    "with exclusive_lock(sys.argv[1], command='holder'):\n"
    "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
)


def _holder(path, seconds):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_refused_naming_the_holder_and_released_when_killed(tmp_path):
    path = tmp_path / "I.npz.lock"
    proc = _holder(path, 600)
    try:
        with pytest.raises(LockHeld) as held:
            with exclusive_lock(path):
                pass
        assert f"pid {proc.pid} on " in held.value.holder and "`holder`" in held.value.holder
    finally:
        proc.kill()
        proc.wait()
    assert path.exists()  # a killed holder leaves its file ...
    with exclusive_lock(path, command="next"):  # ... which never blocks
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()  # a clean exit removes it


def test_a_waiting_taker_gets_the_lock_when_the_holder_finishes(tmp_path):
    path = tmp_path / "I.npz.lock"
    proc = _holder(path, 0.5)
    waited = []
    with exclusive_lock(path, wait_seconds=60, on_wait=waited.append):
        # The holder released the lock when it left its block; its interpreter may still be
        # shutting down (under load), so wait for the exit rather than poll it.
        assert proc.wait(timeout=60) == 0
    assert len(waited) == 1 and f"pid {proc.pid}" in waited[0]


def test_threads_taking_and_removing_the_lock_never_overlap(tmp_path):
    path = tmp_path / "x.lock"
    inside, overlaps = [0], []
    guard = threading.Lock()

    def worker():
        for _ in range(40):
            with exclusive_lock(path, wait_seconds=60):
                with guard:
                    inside[0] += 1
                    overlaps.append(inside[0])
                with guard:
                    inside[0] -= 1

    # flock is per open file description, so threads of one process exclude each other too.
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 160 and max(overlaps) == 1
    assert not path.exists()
