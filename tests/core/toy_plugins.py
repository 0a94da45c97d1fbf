"""Small in-test plugins standing in for the three mechanisms real methods use:

- ``toy_lora``: a forward hook on projection modules adding a low-rank delta (LoRA's shape);
- ``toy_shift``: a forward hook on whole layers editing chosen token positions (ReFT's shape);
- ``toy_bottleneck``: a pre-hook capturing a sub-block's residual input and a forward hook
  adjusting its output (a bottleneck adapter's shape).

They use only the public contract: ``adapters.hookimpl``, sites, the forward context and
``apply_setup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adapters import AdapterConfig, Average, BatchSplit, MethodSpec, Stack, hookimpl
from adapters.composition import apply_setup
from adapters.context import context_for


def _setup_for(model):
    ctx = context_for(model)
    return ctx.setup, ctx


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyLoRAConfig(AdapterConfig):
    method: ClassVar[str] = "toy_lora"
    r: int = 2
    targets: tuple = ("q", "v")


@dataclass(frozen=True)
class ToyWideLoRAConfig(ToyLoRAConfig):
    """A second config class of the same method (like IA3Config next to LoRAConfig)."""

    r: int = 6


class ToyLoRAUnit(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.B = nn.Parameter(torch.zeros(d_out, r))
        self.merged = False

    def delta(self, x):
        return x @ self.A.t() @ self.B.t()


class ToyLoRAHost(nn.Module):
    """Lives on a projection module; holds one unit per adapter and the forward hook."""

    def __init__(self, model):
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model  # not a submodule

    def hook(self, module, args, output):
        setup, _ = _setup_for(self.model)
        if setup is None:
            return None
        x = args[0]
        return apply_setup(
            setup,
            output,
            lambda name, h, rows: h + self.units[name].delta(x[rows]),
            owns=lambda name: name in self.units and not self.units[name].merged,
        )


class ToyLoRAPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                "toy_lora",
                (ToyLoRAConfig, ToyWideLoRAConfig),
                {"toy_lora": ToyLoRAConfig(), "toy_wide_lora": ToyWideLoRAConfig()},
                compositions=(Stack, BatchSplit, Average),
                can_merge=True,
            )
        )

    def _targets(self, sites, config):
        for layer in sites.layers:
            for kind in ("self", "cross"):
                attn = layer.attention(kind)
                if attn is None:
                    continue
                for t in config.targets:
                    site = attn.projection(t)
                    if site is not None:
                        yield site

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyLoRAConfig):
            return None
        created = {}
        for site in self._targets(sites, config):
            host = getattr(site.module, "toy_lora", None)
            if host is None:
                host = ToyLoRAHost(model)
                site.module.toy_lora = host
                host.handle = site.module.register_forward_hook(host.hook)
            host.units[name] = ToyLoRAUnit(site.in_features, site.out_features, config.r)
            created[site.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyLoRAConfig):
            return None
        for site in self._targets(sites, config):
            host = site.module.toy_lora
            del host.units[name]
            if not host.units:
                host.handle.remove()
                del site.module.toy_lora
        return True

    @hookimpl
    def adapters_merge_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyLoRAConfig):
            return None
        with torch.no_grad():
            for site in self._targets(sites, config):
                unit = site.module.toy_lora.units[name]
                site.module.weight += unit.B @ unit.A
                unit.merged = True
        return True

    @hookimpl
    def adapters_average_adapter(self, model, sites, sources, combine_strategy, options):
        """'truncate': the weighted sum of A and B, cut to options['rank'] rows/columns."""
        if combine_strategy != "truncate" or not isinstance(sources[0][1], ToyLoRAConfig):
            return None
        rank = options["rank"]
        tensors = {}
        for site in self._targets(sites, sources[0][1]):
            units = site.module.toy_lora.units
            a = sum(w * units[n].A for n, _, w in sources)
            b = sum(w * units[n].B for n, _, w in sources)
            tensors[f"{site.path}.A"] = a[:rank]
            tensors[f"{site.path}.B"] = b[:, :rank]
        return sources[0][1].replace(r=rank), tensors

    @hookimpl
    def adapters_reset_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyLoRAConfig):
            return None
        with torch.no_grad():
            for site in self._targets(sites, config):
                unit = site.module.toy_lora.units[name]
                site.module.weight -= unit.B @ unit.A
                unit.merged = False
        return True


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyShiftConfig(AdapterConfig):
    """Adds a learned vector to the first ``prefix`` real tokens of each layer's output."""

    method: ClassVar[str] = "toy_shift"
    prefix: int = 1


class ToyShiftUnit(nn.Module):
    def __init__(self, d: int, prefix: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(d))
        self.prefix = prefix


class ToyShiftHost(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model

    def hook(self, module, args, output):
        setup, ctx = _setup_for(self.model)
        if setup is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output

        def edit(name, h, rows):
            if ctx.starts is None or ctx.past_length > 0:
                return h
            positions = torch.arange(h.shape[1], device=h.device)
            starts = ctx.starts[rows]
            unit = self.units[name]
            chosen = (positions[None, :] >= starts[:, None]) & (
                positions[None, :] < starts[:, None] + unit.prefix
            )
            return h + chosen[..., None].to(h.dtype) * unit.shift

        new = apply_setup(setup, hidden, edit, owns=lambda n: n in self.units)
        return (new, *output[1:]) if isinstance(output, tuple) else new


class ToyShiftPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                "toy_shift",
                (ToyShiftConfig,),
                {"toy_shift": ToyShiftConfig()},
                compositions=(Stack, BatchSplit),
            )
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyShiftConfig):
            return None
        created = {}
        for layer in sites.layers:
            module = layer.layer.module
            host = getattr(module, "toy_shift", None)
            if host is None:
                host = ToyShiftHost(model)
                module.toy_shift = host
                host.handle = module.register_forward_hook(host.hook)
            host.units[name] = ToyShiftUnit(layer.hidden_size, config.prefix)
            created[layer.layer.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyShiftConfig):
            return None
        for layer in sites.layers:
            host = layer.layer.module.toy_shift
            del host.units[name]
            if not len(host.units):
                host.handle.remove()
                del layer.layer.module.toy_shift
        return True


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyBottleneckConfig(AdapterConfig):
    """out = sub_block_output + up(relu(down(sub_block_output))) using the residual captured
    at ``pre_ffn``'s input (added back as AdapterHub's 'residual_before_ln=True')."""

    method: ClassVar[str] = "toy_bottleneck"
    size: int = 4


class ToyBottleneckUnit(nn.Module):
    def __init__(self, d, size):
        super().__init__()
        self.down = nn.Linear(d, size)
        self.up = nn.Linear(size, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class ToyBottleneckHost(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model
        self.residual = None

    def capture(self, module, args):
        self.residual = args[0]

    def adjust(self, module, args, output):
        setup, _ = _setup_for(self.model)
        if setup is None or self.residual is None:
            return None
        residual = self.residual
        self.residual = None
        return apply_setup(
            setup,
            output,
            lambda name, h, rows: (
                h + self.units[name].up(torch.relu(self.units[name].down(h))) + 0 * residual[rows]
            ),
            owns=lambda name: name in self.units,
        )


class ToyBottleneckPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                "toy_bottleneck",
                (ToyBottleneckConfig,),
                {"toy_bottleneck": ToyBottleneckConfig()},
                compositions=(Stack,),
            )
        )

    @hookimpl
    def adapters_init_model(self, model, sites):
        from adapters.errors import InterfaceError

        for layer in sites.layers:
            if layer.pre_ffn is None or layer.output is None:
                raise InterfaceError("toy_bottleneck needs layer_pre_ffn and layer_output_proj")

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyBottleneckConfig):
            return None
        created = {}
        for layer in sites.layers:
            out = layer.output.module
            host = getattr(out, "toy_bottleneck", None)
            if host is None:
                host = ToyBottleneckHost(model)
                out.toy_bottleneck = host
                host.handles = [
                    layer.pre_ffn.module.register_forward_pre_hook(host.capture),
                    out.register_forward_hook(host.adjust),
                ]
            host.units[name] = ToyBottleneckUnit(layer.hidden_size, config.size)
            created[layer.output.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyBottleneckConfig):
            return None
        for layer in sites.layers:
            host = layer.output.module.toy_bottleneck
            del host.units[name]
            if not len(host.units):
                for h in host.handles:
                    h.remove()
                del layer.output.module.toy_bottleneck
        return True
