"""Dispatch to foreign checkpoint formats (PEFT, AdapterHub, a third party's): which
plugin-registered `CheckpointFormat` writes a (format, method) pair and its options, and
the adapter name a foreign folder records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..registry.loading import get_registry
from .format import FORMAT


def writer_for(format: str, method: str, attr: str, what: str, own: str = FORMAT) -> Any:
    """The registered `CheckpointFormat` called ``format`` (or with that alias) that serves
    ``method`` and has a writer ``attr`` (``"write"`` or ``"write_fusion"``); otherwise
    `CheckpointError` naming the formats that can write ``what`` (``own``: this library's)."""
    registry = get_registry()
    fmt = registry.format_for(format, method)
    if fmt is not None and getattr(fmt, attr) is not None:
        return fmt
    writable = {
        n for f in registry.formats if f.serves(method) and getattr(f, attr) for n in f.names()
    }
    reason = ""
    if fmt is not None:
        reason = ": it is read-only"
    else:
        served = sorted({m for f in registry.formats if format in f.names() for m in f.methods})
        if served:
            reason = f": it serves the methods {served} and this is a {method!r} adapter"
    raise CheckpointError(
        f"cannot write format {format!r} for {what}{reason}; formats that can: "
        f"{[*sorted(writable), own]}"
    )


def check_write_options(fmt: Any, format: str, options: Mapping[str, Any]) -> None:
    """Refuse options ``fmt`` (a `CheckpointFormat`) does not declare in ``write_options``."""
    unknown = sorted(set(options) - set(fmt.write_options))
    if unknown:
        accepted = list(fmt.write_options) or "none"
        raise CheckpointError(
            f"format {format!r} (plugin {fmt.plugin!r}) does not take the option(s) {unknown}; "
            f"its options: {accepted}"
        )


def _saved_name(fmt: Any, path: str) -> str | None:
    """The name ``fmt`` says the directory records, or None (a failing plugin is ignored)."""
    if fmt.saved_name is None:
        return None
    try:
        name = fmt.saved_name(path)
    except Exception:  # optional information: a broken plugin must not break loading
        return None
    return name if isinstance(name, str) else None
