"""What the fault-injection tests share: a tiny model whose adapters carry a marker value, the
saves they interrupt, and the check that a folder holds one complete save.

Every tensor of every adapter is set to the same number (the marker) before a save, so a load
that mixed files of two saves would show two numbers.

``python -m tests.faults.saving KIND TARGET START`` saves in a loop in a fresh interpreter
(marker START, START + 1, ...), printing one line per finished save, until it is killed.

``python -m tests.faults.saving serve`` is a fork server: a fresh, single-threaded interpreter
that builds the model once and forks saving processes on command (stdin), so that the tests
fork from a process without threads (forking pytest itself, whose earlier tests may have
started threads, could deadlock the child). Every line it or its children print is
``<tag> <pid> <value>``:

- ``forever KIND TARGET START`` → ``pid <pid> 0``; the child saves markers START, START + 1, ...
  printing ``saved <pid> <marker>`` after each save, until killed;
- ``count KIND TARGET START N`` → ``pid <pid> 0``; the child saves N markers and prints
  ``done <pid> 0``;
- ``wait PID`` → ``reaped <pid> <status>`` once the child is gone (every line it printed comes
  before).
"""

from __future__ import annotations

import os
import sys

import torch

import adapters
from adapters import plugins

from ..core.toy_plugins import ToyLoRAPlugin
from ..models import SEED_INTERFACE, llama

NAMES = ("a", "b")
KINDS = ("save_adapter", "save_all_adapters", "save_pretrained")


def register_plugin() -> None:
    """The in-test LoRA-shaped plugin (idempotent)."""
    registry = plugins.get_registry()
    if "toy_lora" not in registry.methods:
        registry.register(ToyLoRAPlugin(), "toy_lora")


def unregister_plugin() -> None:
    registry = plugins.get_registry()
    if "toy_lora" in registry.methods:
        registry.unregister("toy_lora")


def build(names=NAMES):
    """A tiny Llama with toy LoRA adapters ``names``."""
    register_plugin()
    model = llama(num_hidden_layers=1)
    adapters.init(model, interface={**SEED_INTERFACE, "adapter_methods": ["toy_lora"]})
    for name in names:
        model.add_adapter(name, config="toy_lora[r=2]")
    return model


def mark(model, value: float) -> None:
    """Set every tensor of every adapter to ``value``."""
    with torch.no_grad():
        for name in model.adapters_config:
            for tensor in model.adapter_state_dict(name).values():
                tensor.fill_(value)


def save(model, kind: str, target: str) -> None:
    if kind == "save_adapter":
        model.save_adapter(target, "a")
    else:
        getattr(model, kind)(target)


def load_marker(kind: str, target: str) -> float:
    """Load ``target`` (saved by ``kind``) into a fresh model and return the one marker all its
    adapter tensors hold; fails if they hold several (a mix of saves)."""
    register_plugin()
    if kind == "save_pretrained":
        model = adapters.load_model(target, type(llama()))
    else:
        model = build(names=())
        if kind == "save_adapter":
            model.load_adapter(target)
        else:
            model.load_all_adapters(target)
    return marker_of(model)


def read_marker(kind: str, target: str, model) -> float:
    """Like `load_marker` for ``save_adapter`` / ``save_all_adapters`` folders, but only
    reading them (with ``model``, built once): many reads per save."""
    from adapters.checkpoint.adapter import read_adapter, read_all_adapters

    if kind == "save_adapter":
        reads = [read_adapter(model, target)]
    else:
        reads = [read for _, read in read_all_adapters(model, target)]
    values = {
        float(v) for read in reads for tensor in read.tensors.values() for v in tensor.flatten()
    }
    assert len(values) == 1, f"one save's tensors hold one marker, got {sorted(values)[:5]}"
    return values.pop()


def marker_of(model) -> float:
    values = {
        float(v)
        for name in model.adapters_config
        for tensor in model.adapter_state_dict(name).values()
        for v in tensor.flatten().tolist()
    }
    assert len(values) == 1, f"one save's tensors hold one marker, got {sorted(values)[:5]}"
    return values.pop()


def save_forever(model, kind: str, target: str, start: int, report) -> None:
    """Save markers start, start + 1, ... into ``target``; ``report(n)`` after each save."""
    torch.set_num_threads(1)
    value = start
    while True:
        mark(model, float(value))
        save(model, kind, target)
        report(value)
        value += 1


def _say(tag: str, pid: int, value: float | int = 0) -> None:
    os.write(1, f"{tag} {pid} {value}\n".encode())  # one write: lines never interleave


def _fork(work) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def serve() -> None:
    """The fork server (see the module docstring)."""
    torch.set_num_threads(1)
    model = build()
    _say("ready", os.getpid())
    for line in sys.stdin:
        command, *args = line.split()
        if command == "forever":
            kind, target, start = args[0], args[1], int(args[2])

            def forever(kind=kind, target=target, start=start) -> None:
                report = lambda value: _say("saved", os.getpid(), value)  # noqa: E731
                save_forever(model, kind, target, start, report)

            _say("pid", _fork(forever))
        elif command == "count":
            kind, target, start, count = args[0], args[1], int(args[2]), int(args[3])

            def work(kind=kind, target=target, start=start, count=count) -> None:
                for value in range(start, start + count):
                    mark(model, float(value))
                    save(model, kind, target)
                _say("done", os.getpid())

            _say("pid", _fork(work))
        elif command == "wait":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            _say("reaped", pid, status)


def main(argv: list[str]) -> None:
    if argv == ["serve"]:
        serve()
        return
    kind, target, start = argv[0], argv[1], int(argv[2])
    model = build()
    print("ready", flush=True)
    save_forever(model, kind, target, start, lambda value: print(value, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# the test's side of the fork server
# ---------------------------------------------------------------------------------------------


class ForkServer:
    """Talks to ``python -m tests.faults.saving serve`` (see the module docstring). Every wait
    has a deadline: a child that hangs fails the test instead of stalling it."""

    def __init__(self, root: str, deadline: float = 120.0) -> None:
        import subprocess

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *sys.path]))
        self.deadline = deadline
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.saving", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env=env,
        )
        self._buffer = b""
        #: the last marker each child reported saved; the pids of children that are done
        self.saved: dict[int, int] = {}
        self.done: set[int] = set()
        self.expect("ready")

    def _line(self, timeout: float) -> tuple[str, int, float] | None:
        import select

        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            assert chunk, "the fork server ended"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        tag, pid, value = line.decode().split()
        if tag == "saved":
            self.saved[int(pid)] = int(float(value))
        elif tag == "done":
            self.done.add(int(pid))
        return tag, int(pid), float(value)

    def expect(self, tag: str, pid: int | None = None) -> tuple[int, float]:
        """Read lines until ``tag`` (for ``pid``) arrives; returns (pid, value)."""
        import time

        end = time.monotonic() + self.deadline
        while True:
            line = self._line(max(0.0, end - time.monotonic()))
            assert line is not None, f"no {tag!r} from the fork server in {self.deadline} s"
            if line[0] == tag and (pid is None or line[1] == pid):
                return line[1], line[2]

    def poll(self) -> None:
        """Take in whatever lines have arrived, without waiting."""
        while self._line(0.0) is not None:
            pass

    def send(self, *words: object) -> None:
        self.process.stdin.write((" ".join(map(str, words)) + "\n").encode())
        self.process.stdin.flush()

    def fork(self, *words: object) -> int:
        self.send(*words)
        return self.expect("pid")[0]

    def reap(self, pid: int) -> int:
        """Wait until child ``pid`` is gone; returns its wait status."""
        self.send("wait", pid)
        return int(self.expect("reaped", pid)[1])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.kill()
        self.process.wait()
