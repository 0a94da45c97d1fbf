"""``average_adapter``: a new adapter as a weighted combination of existing ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checkpoint.adapter import load_tensors
from ..configs import AdapterConfig, config_parts
from ..errors import ConfigError
from ..registry.loading import get_registry


def average_adapter(
    model: nn.Module,
    adapter_name: str,
    adapter_list: list[str],
    weights: list[float] | None,
    combine_strategy: str,
    normalize_weights: bool,
    overwrite_ok: bool,
    set_active: bool,
    options: dict[str, Any],
) -> None:
    """See `ModelAdaptersMixin.average_adapter`. Atomic: on error no adapter is added."""
    if not adapter_list:
        raise ConfigError("average_adapter needs at least one adapter in adapter_list")
    entries = [model._entry(n) for n in adapter_list]  # type: ignore[operator]
    if weights is None:  # equal weights 1/n, normalised or not (as AdapterHub)
        values = [1.0 / len(entries)] * len(entries)
    else:
        values = [float(w) for w in weights]
    if len(values) != len(entries):
        raise ConfigError(f"got {len(values)} weights for {len(entries)} adapters")
    if normalize_weights and weights is not None:
        total = sum(values)
        if total == 0:
            raise ConfigError("weights sum to 0 and cannot be normalised")
        values = [w / total for w in values]
    configs = [e.config for e in entries]
    if combine_strategy == "linear" and not configs_equal_for_average(configs):
        raise ConfigError(
            "combine_strategy='linear' needs adapters with identical configs (dropout and "
            f"init_weights may differ); got {[c.to_dict() for c in configs]}"
        )
    if options and combine_strategy == "linear":
        raise ConfigError(f"combine_strategy='linear' takes no options; got {sorted(options)}")
    if combine_strategy == "linear":
        states = [e.state_dict() for e in entries]
        combined = {
            key: sum(w * s[key].to(torch.float32) for w, s in zip(values, states))
            for key in states[0]
        }
        config = configs[0]  # the first source's, dropout and init_weights included
    else:
        answer = get_registry().call_owner(
            "adapters_average_adapter",
            configs[0].method,
            model=model,
            sites=model.adapter_sites,  # type: ignore[attr-defined]
            sources=list(zip(adapter_list, configs, values)),
            combine_strategy=combine_strategy,
            options=dict(options),
        )
        if answer is None:
            raise ConfigError(
                f"combine_strategy={combine_strategy!r} is not supported for "
                f"{configs[0].method!r} adapters; use 'linear'"
            )
        config, combined = answer
    model.add_adapter(adapter_name, config, overwrite_ok=overwrite_ok)  # type: ignore
    try:
        load_tensors(model, adapter_name, combined, source="average")
    except BaseException:
        model.delete_adapter(adapter_name)  # type: ignore[operator]
        raise
    if set_active:
        model.set_active_adapters(adapter_name)  # type: ignore[operator]


AVERAGE_IGNORED_FIELDS = ("dropout", "init_weights")


def configs_equal_for_average(configs: list[AdapterConfig]) -> bool:
    """Whether adapters with these configs have identical parameter layouts: equal configs
    except for `AVERAGE_IGNORED_FIELDS` (dropout and initialisation)."""

    def key(config: AdapterConfig) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in part.to_dict().items() if k not in AVERAGE_IGNORED_FIELDS}
            for part in config_parts(config)
        ]

    first = key(configs[0])
    return all(key(other) == first for other in configs[1:])
