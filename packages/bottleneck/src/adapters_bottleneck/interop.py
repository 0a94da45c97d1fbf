"""AdapterHub bottleneck checkpoints (format ``"adapterhub-bottleneck"``)."""

from __future__ import annotations

from adapters import CheckpointFormat

FORMAT_NAME = "adapterhub-bottleneck"


def detect(path: str) -> bool:
    return False


def read(path, model, sites, config):
    raise NotImplementedError


ADAPTERHUB_FORMAT = CheckpointFormat(name=FORMAT_NAME, detect=detect, read=read)
