"""``adapters convert``: rewrite a foreign adapter checkpoint (AdapterHub, PEFT, or any format an
installed plugin reads) in this library's format, or ours in a foreign one.

A checkpoint's tensors are tied to the model they were trained on, so the command loads that
model (``--model``, a local path or hub name; ``--model-class``, default ``AutoModel``),
prepares it with ``--interface`` (an ``adapter_interface.json`` or the JSON of an
`AdapterModelInterface`), loads the adapter and saves it::

    adapters convert ah_sentiment/ ours_sentiment/ --model bert-base-uncased \\
        --interface bert_interface.json
    adapters convert ours/ peft_dir/ --model ... --interface ... --format peft
    adapters convert ours/ ah_dir/ --model ... --interface ... --format adapterhub \\
        --option layout=builtin

``--option KEY=VALUE`` (repeatable) passes a foreign format's write options (its
``CheckpointFormat.write_options``) to ``save_adapter``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from torch import nn

from .._runtime.initialization import init
from ..errors import AdaptersError, CheckpointError
from ..interface import AdapterModelInterface


def add_command(subparsers: Any) -> None:
    """Add ``convert`` to the ``adapters`` command."""
    parser = subparsers.add_parser(
        "convert",
        help="rewrite an adapter checkpoint (AdapterHub, PEFT, ...) in this library's format",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="the adapter directory to read (any format a plugin reads)")
    parser.add_argument("target", help="the directory to write (created or replaced atomically)")
    parser.add_argument("--model", required=True, help="the base model: a local path or hub name")
    parser.add_argument(
        "--model-class",
        default="AutoModel",
        help="the transformers class that loads --model (default AutoModel; e.g. "
        "AutoModelForCausalLM)",
    )
    parser.add_argument(
        "--interface", required=True, help="a JSON file with the model's AdapterModelInterface"
    )
    parser.add_argument(
        "--config", help="a config for checkpoints that do not say enough (e.g. DiReFT)"
    )
    parser.add_argument("--name", help="the adapter's name in the target (default: the saved one)")
    parser.add_argument(
        "--format", help="write this foreign format instead of ours (e.g. peft)", default=None
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the --format writer (e.g. layout=builtin for adapterhub); repeatable",
    )
    parser.set_defaults(func=convert_command)


def convert(
    source: str,
    target: str,
    model: Any,
    interface: AdapterModelInterface,
    *,
    config: Any = None,
    name: str | None = None,
    format: str | None = None,
    options: dict[str, Any] | None = None,
) -> str:
    """Load adapter ``source`` onto ``model`` (prepared with ``interface``) and save it into
    ``target``, in this library's format or in ``format`` (with its write ``options``).
    Returns the adapter's name."""
    if options and format is None:
        raise CheckpointError(
            f"options {sorted(options)} are options of a foreign format's writer; pass format="
        )
    init(model, interface=interface)
    loaded = model.load_adapter(source, config=config, load_as=name)
    model.save_adapter(target, loaded, format=format, **(options or {}))
    return loaded


def _load_model(model_class: Any, class_name: str, model: str) -> Any:
    """``model_class.from_pretrained(model)``; anything else than a model, or a failure of
    transformers (a folder that holds no model, a class of another kind), is `CheckpointError`
    naming both."""
    try:
        loaded = model_class.from_pretrained(model)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # transformers raises many types for a folder without a model
        raise CheckpointError(
            f"--model {model!r} could not be loaded with {class_name}.from_pretrained: "
            f"{type(error).__name__}: {error}. --model must name a model (a hub name or a folder "
            "with config.json and weights), not the adapter"
        ) from None
    if not isinstance(loaded, nn.Module):
        raise CheckpointError(
            f"--model-class {class_name} loaded a {type(loaded).__name__}, not a model; use a "
            "model class such as AutoModel or AutoModelForCausalLM"
        )
    return loaded


def _interface(path: str) -> AdapterModelInterface:
    try:
        return AdapterModelInterface.load(path)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"--interface {path!r} is not an AdapterModelInterface JSON file: "
            f"{type(error).__name__}: {error}"
        ) from None


def _options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CheckpointError(f"--option {pair!r} is not KEY=VALUE (e.g. layout=builtin)")
        options[key.strip()] = value.strip()
    return options


def convert_command(args: argparse.Namespace) -> int:
    """Run ``adapters convert``; returns the exit status (2 on bad input)."""
    try:
        import transformers
    except ImportError:
        print("adapters convert: pip install 'adapters-core[transformers]'", file=sys.stderr)
        return 2
    model_class = getattr(transformers, args.model_class, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        print(
            f"adapters convert: --model-class {args.model_class!r} is not a transformers model "
            "class (e.g. AutoModel, AutoModelForCausalLM)",
            file=sys.stderr,
        )
        return 2
    try:
        options = _options(args.option)
        interface = _interface(args.interface)
        model = _load_model(model_class, args.model_class, args.model)
        name = convert(
            args.source,
            args.target,
            model,
            interface,
            config=args.config,
            name=args.name,
            format=args.format,
            options=options,
        )
    except (AdaptersError, OSError, ValueError) as error:
        print(f"adapters convert: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(f"converted adapter {name!r}: {args.source} -> {args.target}")
    return 0
