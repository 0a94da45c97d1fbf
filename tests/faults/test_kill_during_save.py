"""``kill -9`` of a process in the middle of its saves, at random points: the folder always
holds one complete save (the last finished one or the one in flight), the user's files in it
survive, and the next save removes the temporary folders the killed one left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .saving import KINDS, build, load_marker, save

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

#: Kills per kind of save; each one lands at a random point of a save.
KILLS = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _user_files(folder: str) -> dict[str, bytes]:
    files = {".git/HEAD": b"ref: refs/heads/main\n", ".env": b"X=1\n", "notes/n.txt": b"mine"}
    for rel, data in files.items():
        path = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def _read_user_files(folder: str, files: dict[str, bytes]) -> dict[str, bytes]:
    found = {}
    for rel in files:
        with open(os.path.join(folder, *rel.split("/")), "rb") as f:
            found[rel] = f.read()
    return found


def _leftovers(parent: str, base: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


@pytest.mark.parametrize("kind", KINDS)
def test_kill_minus_9_at_random_points_leaves_the_old_or_the_new_save(tmp_path, kind, fork_server):
    rng = random.Random(f"kill-{kind}")
    target = str(tmp_path / "saved")
    os.makedirs(target)
    user = _user_files(target)
    newest = -1
    for trial in range(KILLS):
        start = 1000 * (trial + 1)
        pid = fork_server.fork("forever", kind, target, start)
        try:
            fork_server.expect("saved", pid)  # the child saved once: it is warm
            time.sleep(rng.uniform(0, 0.08))  # then the kill lands anywhere in a later save
        finally:
            os.kill(pid, signal.SIGKILL)
            fork_server.reap(pid)  # every "saved" line of the child has been read by now
        last_finished = fork_server.saved[pid]
        marker = load_marker(kind, target)
        # the last finished save or the one in flight (the swap is one step), never older
        assert marker in (last_finished, last_finished + 1), (marker, last_finished)
        assert marker > newest
        newest = marker
        assert _read_user_files(target, user) == user
    save(build(), kind, target)  # the next save, alone in the folder, cleans up
    assert _leftovers(str(tmp_path), "saved") == []
    assert _read_user_files(target, user) == user


def test_kill_minus_9_of_a_fresh_interpreter_saving(tmp_path):
    """The same with a separate Python process (no fork): started, killed, started again."""
    target = str(tmp_path / "saved")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *sys.path]))
    rng = random.Random("fresh")
    for trial in range(2):
        start = 1000 * (trial + 1)
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.saving", "save_all_adapters", target, str(start)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            first = int(child.stdout.readline())
            assert first == start
            time.sleep(rng.uniform(0, 0.1))
        finally:
            child.kill()
            child.wait()
        lines = [int(line) for line in child.stdout.read().split()]
        last_finished = lines[-1] if lines else first
        assert load_marker("save_all_adapters", target) in (last_finished, last_finished + 1)
    build().save_all_adapters(target)
    assert _leftovers(str(tmp_path), "saved") == []
