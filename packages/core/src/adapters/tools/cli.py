"""The ``adapters`` command: ``adapters plugins`` lists installed methods and load errors,
``adapters demo`` trains, saves and reloads an adapter of an installed method on a tiny model.
Distributions may add sub-commands through the entry-point group ``adapters.commands`` (a
callable that receives argparse's sub-parsers); they cannot replace a built-in command."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from ..registry.loading import get_registry
from . import convert, demo

COMMANDS_GROUP = "adapters.commands"


def plugins_command(args: argparse.Namespace) -> int:
    """Print installed methods (distribution, version, presets), load errors and conflicts;
    exit status 1 if any plugin was not loaded."""
    registry = get_registry()
    if not registry.methods and not registry.load_errors:
        print("no adapter method plugins installed; e.g. pip install adapters-lora")
    rows = [("method", "distribution", "version", "presets", "compositions")]
    for name, spec in sorted(registry.methods.items()):
        rows.append(
            (
                name,
                spec.distribution or f"(in-process: {spec.plugin})",
                spec.version or "-",
                ", ".join(spec.presets) or "-",
                _compositions(spec.compositions),
            )
        )
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if registry.formats:
        print("checkpoint formats: " + ", ".join(registry.format_names()))
    for name in registry.disabled:
        print(f"disabled by ADAPTERS_DISABLE_PLUGINS: {name}")
    for error in registry.load_errors:
        where = f" ({error.distribution})" if error.distribution else ""
        if error.kind == "conflict":
            line = f"CONFLICT: plugin {error.name!r}{where} was not loaded: {error.error}"
        else:
            line = f"FAILED to load plugin {error.name!r}{where}: {error.error}"
        print(line, file=sys.stderr)
        if args.verbose:
            print(error.detail, file=sys.stderr)
    return 1 if registry.load_errors else 0


def _compositions(blocks: tuple[type, ...]) -> str:
    names = [b.__name__ for b in blocks]
    if "BatchSplit" in names:
        names.append("Parallel")  # core runs Parallel as batch replication + BatchSplit
    return ", ".join(names) or "-"


def build_parser() -> argparse.ArgumentParser:
    """The ``adapters`` argument parser: built-in commands, then plugin commands."""
    parser = argparse.ArgumentParser(prog="adapters", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list installed adapter methods and load errors")
    plugins.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    plugins.set_defaults(func=plugins_command)
    demo.add_command(sub)
    convert.add_command(sub)
    builtin = set(sub.choices)
    for ep in metadata.entry_points(group=COMMANDS_GROUP):
        if ep.name in builtin:  # checked before loading: a stale or rogue entry point is inert
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
            print(
                f"warning: command plugin {ep.name!r} ({dist}) ignored: {ep.name!r} is a "
                "built-in command of adapters-core",
                file=sys.stderr,
            )
            continue
        try:
            register = ep.load()
            register(sub)
        except (Exception, SystemExit) as error:  # a broken command must not end the others
            print(f"warning: command plugin {ep.name!r} failed to load: {error}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adapters`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
