"""Saves and loads of one folder at the same time, from threads and from processes: every load
gives one complete save (one marker in every tensor) or this library's `CheckpointError`,
never a raw error, and never because the folder was briefly absent."""

from __future__ import annotations

import os
import threading

import pytest

from adapters import CheckpointError
from adapters.checkpoint import atomic

from .saving import build, load_marker, mark, read_marker, save

SAVES = 12


def _check_outcomes(
    markers: list[float], errors: list[BaseException], valid: set[float], exchanged: bool = True
) -> None:
    raw = [e for e in errors if not isinstance(e, CheckpointError)]
    assert raw == [], f"raw errors: {raw[:3]}"
    absent = [e for e in errors if "not a directory" in str(e) or "does not exist" in str(e)]
    if exchanged and atomic._RENAMEAT2 is not None:  # swapped in one step: never absent
        assert absent == [], absent[:3]
    assert markers, f"no load succeeded; errors: {errors[:3]}"
    assert set(markers) <= valid, sorted(set(markers) - valid)[:5]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize("kind", ["save_adapter", "save_all_adapters"])
def test_threads_saving_and_reading_one_folder(tmp_path, kind, swap, monkeypatch):
    if swap == "two renames":
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    elif atomic._RENAMEAT2 is None:
        pytest.skip("renameat2 is Linux-only")
    target = str(tmp_path / "saved")
    first = build()
    mark(first, 0.0)
    save(first, kind, target)
    writers = [build() for _ in range(2)]
    readers = [build(names=()) for _ in range(2)]
    markers: list[float] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write(index: int) -> None:
        model = writers[index]  # each writer its own model; saves of one target run freely
        for i in range(SAVES):
            mark(model, float(100 * (index + 1) + i))
            save(model, kind, target)

    def read(index: int) -> None:
        while not done.is_set():  # a tight loop: many reads during every save
            try:
                markers.append(read_marker(kind, target, readers[index]))
            except BaseException as error:  # recorded; the test asserts on the types
                errors.append(error)

    reading = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    writing = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in reading + writing:
        thread.start()
    for thread in writing:
        thread.join()
    done.set()
    for thread in reading:
        thread.join()
    valid = {0.0} | {float(100 * (w + 1) + i) for w in range(2) for i in range(SAVES)}
    _check_outcomes(markers, errors, valid, exchanged=swap == "exchange")
    final = load_marker(kind, target)  # a full load into a fresh model
    assert final in {float(100 * (w + 1) + SAVES - 1) for w in range(2)}
    assert sorted(os.listdir(tmp_path)) == ["saved"]


@pytest.mark.parametrize("kind", ["save_all_adapters", "save_pretrained"])
def test_processes_saving_while_another_loads(tmp_path, kind, fork_server):
    target = str(tmp_path / "saved")
    model = build()
    mark(model, 0.0)
    save(model, kind, target)
    reader = build(names=())
    pids = [fork_server.fork("count", kind, target, base, SAVES) for base in (100, 200)]
    markers: list[float] = []
    errors: list[BaseException] = []
    try:
        while not fork_server.done >= set(pids):
            try:
                if kind == "save_pretrained":
                    markers.append(load_marker(kind, target))
                else:
                    markers.append(read_marker(kind, target, reader))
            except BaseException as error:  # recorded; the test asserts on the types
                errors.append(error)
            fork_server.poll()
    finally:
        statuses = [fork_server.reap(pid) for pid in pids]
    assert statuses == [0, 0]
    valid = {0.0} | {float(base + i) for base in (100, 200) for i in range(SAVES)}
    _check_outcomes(markers, errors, valid)
    assert load_marker(kind, target) in {100.0 + SAVES - 1, 200.0 + SAVES - 1}
