"""Dispatch to foreign checkpoint formats (PEFT, AdapterHub, a third party's): which
plugin-registered `CheckpointFormat` writes a (format, method) pair and its options, and
the adapter name a foreign folder records."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import AdaptersError, CheckpointError
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


#: What a plugin's callback may raise that core turns into its own error (or a warning):
#: everything but ``KeyboardInterrupt`` (and ``GeneratorExit``), ``SystemExit`` included.
PLUGIN_FAILURES = (Exception, SystemExit)


def call_format(fmt: Any, callback: str, path: str, **kwargs: Any) -> Any:
    """``fmt.<callback>(path=path, **kwargs)`` (``read``, ``write``, ``read_fusion``,
    ``write_fusion``) of a plugin's `CheckpointFormat`. This library's own errors pass through;
    anything else the plugin raises (``SystemExit`` included) becomes `CheckpointError` naming
    the directory, the format, the plugin and the error."""
    try:
        return getattr(fmt, callback)(path=path, **kwargs)
    except AdaptersError:
        raise
    except PLUGIN_FAILURES as error:
        raise CheckpointError(
            f"{path!r}: {callback}() of format {fmt.name!r} (plugin {fmt.plugin!r}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def claims_of(
    formats: list[Any], attr: str, path: str, stacklevel: int = 3
) -> tuple[list[Any], list[str]]:
    """(the formats whose ``attr``, ``"detect"`` or ``"detect_fusion"``, claims directory
    ``path``; the failures). A plugin whose check raises (anything but ``KeyboardInterrupt``,
    ``SystemExit`` included) is reported with a warning naming it and skipped: one broken
    plugin must not break the other formats."""
    claims, failures = [], []
    for fmt in formats:
        check: Callable[[str], Any] | None = getattr(fmt, attr, None)
        if check is None:
            continue
        try:
            if check(path):
                claims.append(fmt)
        except PLUGIN_FAILURES as error:
            failures.append(
                f"format {fmt.name!r} of plugin {fmt.plugin!r}: {attr}() raised "
                f"{type(error).__name__}: {error}"
            )
    for failure in failures:
        warnings.warn(f"{failure}; that format was skipped for {path!r}", stacklevel=stacklevel)
    return claims, failures


def _saved_name(fmt: Any, path: str) -> str | None:
    """The name ``fmt`` says the directory records, or None (a failing plugin is ignored)."""
    if fmt.saved_name is None:
        return None
    try:
        name = fmt.saved_name(path)
    except PLUGIN_FAILURES:  # optional information: a broken plugin must not break loading
        return None
    return name if isinstance(name, str) else None
