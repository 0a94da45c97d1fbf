"""Bottleneck modules: the adapter block, PHM (Compacter) projections, invertible couplings.

Written from the papers:

- a bottleneck adapter computes ``delta(x) = gate(x) * dropout(scaling * up(act(down(x))))``
  (Houlsby et al., 2019; Pfeiffer et al., 2020; scaling from He et al., 2021);
- a PHM layer (Zhang et al., 2021; Compacter, Mahabadi et al., 2021) builds its weight as a sum
  of Kronecker products ``H = sum_i A_i (x) W_i`` with ``n = phm_dim`` small "rule" matrices
  ``A_i`` (n x n) and ``W_i`` (in/n x out/n), optionally low-rank and shared across layers;
- invertible adapters (MAD-X, Pfeiffer et al., 2020) are NICE additive couplings (Dinh et al.,
  2014) or GLOW-style affine couplings (Kingma & Dhariwal, 2018) applied to the embeddings and
  inverted before the output embeddings.

How an adapter sits in a sub-block (what it reads, where its output goes) is decided in
`BottleneckAdapter.step`, described in ``docs/bottleneck.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adapters.plugin import ACTIVATIONS

from .config import BnConfig


class Activation(nn.Module):
    """An activation by name (``"relu"``, ``"swish"``, ...); no parameters."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.lower()
        self.function = ACTIVATIONS[self.name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.function is None else self.function(x)

    def extra_repr(self) -> str:
        return self.name


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw initial weights from ``seed`` without touching the global random state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# PHM (Compacter)
# ---------------------------------------------------------------------------------------------


def kron_sum(rules: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i rules[i] (x) weights[i]`` for ``rules`` (n, n, n) and ``weights`` (n, a, b):
    an (n*a, n*b) matrix."""
    _, a, b = weights.shape
    # (n, n, 1, n, 1) * (n, 1, a, 1, b) -> (n, n, a, n, b): block (p, q) of term i is r_ipq W_i.
    blocks = rules[:, :, None, :, None] * weights[:, None, :, None, :]
    return blocks.sum(0).reshape(rules.shape[1] * a, rules.shape[2] * b)


class PHMShared(nn.Module):
    """What a Compacter adapter shares across its layers: the rule matrices (``phm_rule`` or
    ``phm_rule_left`` / ``phm_rule_right``) and, with ``shared_W_phm``, the down/up weights.

    Saved once per adapter (pitfall 26: never dropped from a checkpoint)."""

    def __init__(self, config: BnConfig, hidden: int, bottleneck: int) -> None:
        super().__init__()
        n = config.phm_dim
        self.factorized_rule = config.factorized_phm_rule
        self.factorized_w = config.factorized_phm_W
        if config.shared_phm_rule:
            for name, shape in _rule_shapes(n, config.factorized_phm_rule):
                tensor = torch.empty(shape)
                _init_rule(tensor, config, shared=True)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=config.learn_phm))
        if config.shared_W_phm:
            for position, (fan_in, fan_out) in (
                ("down", (hidden, bottleneck)),
                ("up", (bottleneck, hidden)),
            ):
                for name, shape in _w_shapes(n, fan_in, fan_out, config):
                    tensor = torch.empty(shape)
                    _init_w(tensor, config)
                    self.register_parameter(f"W_{position}{name[1:]}", nn.Parameter(tensor))

    def rules(self) -> torch.Tensor | None:
        """The (n, n, n) rule matrices, or None if they are not shared."""
        if self.factorized_rule and hasattr(self, "phm_rule_left"):
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)
        return getattr(self, "phm_rule", None)

    def weights(self, position: str) -> torch.Tensor | None:
        """The (n, a, b) weights of the ``"down"`` or ``"up"`` layers, or None."""
        if self.factorized_w and hasattr(self, f"W_{position}_left"):
            return torch.bmm(
                getattr(self, f"W_{position}_left"), getattr(self, f"W_{position}_right")
            )
        return getattr(self, f"W_{position}", None)


def _rule_shapes(n: int, factorized: bool) -> list[tuple[str, tuple[int, ...]]]:
    if factorized:
        return [("phm_rule_left", (n, n, 1)), ("phm_rule_right", (n, 1, n))]
    return [("phm_rule", (n, n, n))]


def _w_shapes(n: int, fan_in: int, fan_out: int, config: BnConfig) -> list[tuple[str, tuple]]:
    a, b = fan_in // n, fan_out // n
    if config.factorized_phm_W:
        return [("W_left", (n, a, config.phm_rank)), ("W_right", (n, config.phm_rank, b))]
    return [("W", (n, a, b))]


def _init_rule(tensor: torch.Tensor, config: BnConfig, shared: bool) -> None:
    with torch.no_grad():
        if config.phm_c_init == "normal":
            tensor.normal_(0.0, config.phm_init_range if shared else 0.01)
        else:
            bound = 1.0 if shared else 0.01
            tensor.uniform_(-bound, bound)


def _init_w(tensor: torch.Tensor, config: BnConfig) -> None:
    with torch.no_grad():
        for i in range(tensor.shape[0]):
            if config.hypercomplex_nonlinearity == "glorot-uniform":
                nn.init.xavier_uniform_(tensor[i])
            elif config.hypercomplex_nonlinearity == "normal":
                tensor[i].normal_(0.0, config.phm_init_range)
            else:  # "glorot-normal", "phm"
                nn.init.xavier_normal_(tensor[i])


class PHMLinear(nn.Module):
    """``y = x H + b`` with ``H = sum_i A_i (x) W_i`` (a parameterised hypercomplex layer).

    Its own parameters are what the config does not share: ``W`` (or ``W_left``/``W_right``),
    ``phm_rule`` (or its factors) and the bias ``b``. Shared ones come from the adapter's
    `PHMShared`, referenced (not owned) so that they are stored once.
    """

    def __init__(
        self, fan_in: int, fan_out: int, position: str, config: BnConfig, shared: PHMShared | None
    ) -> None:
        super().__init__()
        n = config.phm_dim
        self.in_features, self.out_features, self.position = fan_in, fan_out, position
        self.__dict__["shared"] = shared  # a reference, not a submodule
        if not config.shared_W_phm:
            for name, shape in _w_shapes(n, fan_in, fan_out, config):
                tensor = torch.empty(shape)
                _init_w(tensor, config)
                self.register_parameter(name, nn.Parameter(tensor))
        if not config.shared_phm_rule:
            for name, shape in _rule_shapes(n, config.factorized_phm_rule):
                tensor = torch.empty(shape)
                _init_rule(tensor, config, shared=False)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=config.learn_phm))
        self.b = nn.Parameter(torch.zeros(fan_out)) if config.phm_bias else None

    def _weights(self) -> torch.Tensor:
        if hasattr(self, "W_left"):
            return torch.bmm(self.W_left, self.W_right)
        if hasattr(self, "W"):
            return self.W
        return self.shared.weights(self.position)

    def _rules(self) -> torch.Tensor:
        if hasattr(self, "phm_rule_left"):
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)
        if hasattr(self, "phm_rule"):
            return self.phm_rule
        return self.shared.rules()

    def matrix(self) -> torch.Tensor:
        """``H`` (in_features x out_features)."""
        return kron_sum(self._rules(), self._weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix().to(x.dtype)
        return y if self.b is None else y + self.b.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ---------------------------------------------------------------------------------------------
# The bottleneck adapter
# ---------------------------------------------------------------------------------------------


class StochasticDepth(nn.Module):
    """Drops the whole input of an example with probability ``p`` in training (survivors are
    scaled by ``1 / (1 - p)``); identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BottleneckAdapter(nn.Module):
    """One adapter at one sub-block of one layer.

    Parameter names (``adapter_down.0.weight``, ``adapter_up.bias``, ``adapter_norm_after``,
    ``gate``, ``scaling``) follow AdapterHub's, so checkpoints map one to one.
    """

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        config: BnConfig,
        shared: PHMShared | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.hidden, self.bottleneck = hidden, bottleneck
        self.is_parallel = config.is_parallel
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        with seeded(config.init_weights_seed):
            down: list[nn.Module] = []
            if config.ln_before:
                down.append(nn.LayerNorm(hidden))
            if config.phm_layer:
                down.append(PHMLinear(hidden, bottleneck, "down", config, shared))
                up: nn.Module = PHMLinear(bottleneck, hidden, "up", config, shared)
            else:
                down.append(nn.Linear(hidden, bottleneck))
                up = nn.Linear(bottleneck, hidden)
            down.append(Activation(config.non_linearity))
            self.adapter_down = nn.Sequential(*down)
            self.adapter_up = up
            if isinstance(config.scaling, str):
                size = 1 if config.scaling == "learned" else hidden
                self.scaling: nn.Parameter | float = nn.Parameter(torch.ones(size))
            else:
                self.scaling = float(config.scaling)
            self.adapter_norm_after = nn.LayerNorm(hidden) if config.ln_after else None
            self.gate = nn.Linear(hidden, 1) if config.use_gating else None
            self._init_weights(config)
        self.dropout = nn.Dropout(config.dropout)
        self.drop_path = (
            StochasticDepth(config.stochastic_depth) if config.stochastic_depth > 0 else None
        )

    def _projections(self) -> list[nn.Module]:
        return [m for m in (*self.adapter_down, self.adapter_up) if _is_projection(m)]

    def _init_weights(self, config: BnConfig) -> None:
        down = next(m for m in self.adapter_down if _is_projection(m))
        with torch.no_grad():
            if config.init_weights == "bert":
                for module in self._projections():
                    if isinstance(module, nn.Linear):
                        module.weight.normal_(0.0, 0.02)
                        module.bias.zero_()
                if self.gate is not None:
                    self.gate.weight.normal_(0.0, 0.02)
                    self.gate.bias.zero_()
            elif config.init_weights in ("mam_adapter", "lora"):
                if isinstance(down, nn.Linear):
                    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                    down.bias.zero_()
                _zero(self.adapter_up)
                if self.gate is not None:
                    self.gate.weight.normal_(0.0, 0.02)
                    self.gate.bias.zero_()
            elif config.init_weights == "houlsby":
                for module in self._projections():
                    if isinstance(module, nn.Linear):
                        nn.init.trunc_normal_(module.weight, 0.0, 1e-2, -2e-2, 2e-2)
                        module.bias.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` (batch, length, hidden): scaled, dropped
        out, gated; without its residual."""
        up = self.adapter_up(self.adapter_down(x))
        if self.drop_path is not None:
            up = self.drop_path(up)
        out = self.dropout(up * self.scaling)
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)
            out = out * gate
        return out

    def prepare(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's input, its own residual) for a sequential adapter, in the compute
        dtype (see `step`)."""
        dtype = hidden.dtype
        compute = self._compute_dtype(dtype)
        hidden_c = hidden.to(compute)
        residual_c = None if residual is None else residual.to(compute)
        adapter_residual = hidden_c
        x = hidden_c
        if self.original_ln_before:
            x = hidden_c + residual_c
            if self.residual_before_ln == "post_add":
                adapter_residual = x
            if norm is not None:
                x = norm(x.to(dtype)).to(compute)
        if self.residual_before_ln is False:
            adapter_residual = x
        return x, adapter_residual

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled up-projection for input ``x`` (what AdapterFusion attends over)."""
        up = self.adapter_up(self.adapter_down(x.to(self._compute_dtype(x.dtype))))
        return up * self.scaling

    def step(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module | None
    ) -> torch.Tensor:
        """One adapter at a sub-block: from ``hidden`` (the sub-block output before the model's
        residual add, or the previous adapter's output in a Stack) and ``residual`` (the
        sub-block's residual input) to the new ``hidden``; ``norm`` is the layer's own norm
        after the residual add (post-LN models) or None (pre-LN models)."""
        dtype = hidden.dtype
        compute = self._compute_dtype(dtype)
        hidden_c = hidden.to(compute)
        residual_c = None if residual is None else residual.to(compute)
        if self.is_parallel:
            return (hidden_c + self._post_norm(self.delta(residual_c))).to(dtype)
        x, adapter_residual = self.prepare(hidden, residual, norm)
        out = self.delta(x)
        if self.adapter_residual_before_ln:
            out = out + adapter_residual
        out = self._post_norm(out)
        if not self.adapter_residual_before_ln:
            out = out + adapter_residual
        return out.to(dtype)

    def _post_norm(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.adapter_norm_after is None else self.adapter_norm_after(out)

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        param = next(self.parameters(), None)
        return dtype if param is None else torch.promote_types(param.dtype, dtype)

    def extra_repr(self) -> str:
        kind = "parallel" if self.is_parallel else "sequential"
        return f"{kind}, hidden={self.hidden}, bottleneck={self.bottleneck}"


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | PHMLinear)


def _zero(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.weight.zero_()
        module.bias.zero_()
    elif isinstance(module, PHMLinear):
        # H = sum A_i (x) W_i is zero when W is; shared W stays as the other layers need it.
        for name in ("W", "W_left", "W_right"):
            if hasattr(module, name):
                getattr(module, name).zero_()
                break
        if module.b is not None:
            module.b.zero_()


# ---------------------------------------------------------------------------------------------
# Invertible adapters
# ---------------------------------------------------------------------------------------------


def _subnet(fan_in: int, fan_out: int, reduction: float, non_linearity: str) -> nn.Sequential:
    width = max(1, int(fan_in // reduction))
    return nn.Sequential(
        nn.Linear(fan_in, width), Activation(non_linearity), nn.Linear(width, fan_out)
    )


class NICECoupling(nn.Module):
    """Additive coupling (NICE): split ``x = [x1, x2]``; ``y1 = x1 + F(x2)``,
    ``y2 = x2 + G(y1)``; exactly invertible."""

    def __init__(self, width: int, reduction: float, non_linearity: str) -> None:
        super().__init__()
        self.split = width // 2
        rest = width - self.split
        self.F = _subnet(rest, self.split, reduction, non_linearity)
        self.G = _subnet(self.split, rest, reduction, non_linearity)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split :]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), dim=-1)


class GLOWCoupling(nn.Module):
    """Affine coupling (RealNVP / GLOW): ``y1 = x1 * e(s2(x2)) + t2(x2)``,
    ``y2 = x2 * e(s1(y1)) + t1(y1)`` with a soft-clamped scale
    ``e(s) = exp(clamp * 0.636 * atan(s / clamp))``; exactly invertible."""

    def __init__(
        self, width: int, reduction: float, non_linearity: str, clamp: float = 5.0
    ) -> None:
        super().__init__()
        self.split = width // 2
        self.rest = width - self.split
        self.clamp = clamp
        self.s1 = _subnet(self.split, self.rest * 2, reduction, non_linearity)
        self.s2 = _subnet(self.rest, self.split * 2, reduction, non_linearity)

    def _e(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.clamp * 0.636 * torch.atan(s / self.clamp))

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split :]
        if not rev:
            s2, t2 = self.s2(x2).split([self.split, self.split], dim=-1)
            y1 = x1 * self._e(s2) + t2
            s1, t1 = self.s1(y1).split([self.rest, self.rest], dim=-1)
            y2 = x2 * self._e(s1) + t1
        else:
            s1, t1 = self.s1(x1).split([self.rest, self.rest], dim=-1)
            y2 = (x2 - t1) / self._e(s1)
            s2, t2 = self.s2(y2).split([self.split, self.split], dim=-1)
            y1 = (x1 - t2) / self._e(s2)
        return torch.cat((y1, y2), dim=-1)


def invertible_adapter(width: int, config: BnConfig) -> nn.Module:
    """The invertible adapter ``config.inv_adapter`` for embeddings of width ``width``."""
    cls = NICECoupling if config.inv_adapter == "nice" else GLOWCoupling
    with seeded(config.init_weights_seed):
        module = cls(width, float(config.inv_adapter_reduction_factor), config.non_linearity)
        with torch.no_grad():
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.normal_(0.0, 0.02)
                    sub.bias.zero_()
    return module


# ---------------------------------------------------------------------------------------------
# AdapterFusion
# ---------------------------------------------------------------------------------------------


class BottleneckFusion(nn.Module):
    """AdapterFusion (Pfeiffer et al., 2021) at one sub-block: attention of a query (the
    sub-block state) over the fused adapters' outputs.

    ``scores_i = <Q q, K up_i>``; ``p = softmax(scores / T)``; the output is
    ``sum_i p_i V up_i`` (value before the softmax, as AdapterHub; or ``V sum_i p_i up_i``),
    plus the adapter residual (added to each ``up_i`` instead with ``residual_before``).
    Parameter names (``query``, ``key``, ``value``) follow AdapterHub's.
    """

    def __init__(self, hidden: int, config: Any) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Linear(hidden, hidden) if config.query else None
        self.key = nn.Linear(hidden, hidden) if config.key else None
        self.value = nn.Linear(hidden, hidden, bias=False) if config.value else None
        with torch.no_grad():
            for module in (self.query, self.key, self.value):
                if module is not None:
                    module.weight.normal_(0.0, 0.02)
                    if module.bias is not None:
                        module.bias.zero_()
            if self.value is not None and config.value_initialized:
                self.value.weight.copy_(torch.eye(hidden) + (1 - torch.eye(hidden)) * 1e-6)
        self.dropout = nn.Dropout(config.dropout_prob or 0.0)
        self.temperature = 50.0 if config.temperature else 1.0
        self.reduction = self.temperature / 1000.0

    def forward(
        self, query: torch.Tensor, ups: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """``query`` and ``residual`` (batch, length, d); ``ups`` (batch, length, n, d). The
        inputs are cast to the dtype of the layer's weights (``add_adapter_fusion``'s
        ``adapter_dtype``: a float32 fusion layer in a half-precision model computes in
        float32); the caller casts the result back."""
        param = next(self.parameters(), None)
        dtype = query.dtype if param is None else param.dtype
        query, ups, residual = query.to(dtype), ups.to(dtype), residual.to(dtype)
        if self.config.residual_before:
            ups = ups + residual.unsqueeze(2)
        q = self.query(query) if self.query is not None else query
        k = self.key(ups) if self.key is not None else ups
        v = ups
        if self.value is not None and self.config.value_before_softmax:
            v = self.value(ups)
        scores = torch.einsum("bld,blnd->bln", q, k)
        probs = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        if self.training and self.config.temperature:
            self.temperature = max(self.temperature - self.reduction, 1.0)
        context = torch.einsum("bln,blnd->bld", probs, v)
        if self.value is not None and not self.config.value_before_softmax:
            context = self.value(context)
        if not self.config.residual_before:
            context = context + residual
        return context

    def regularization(self) -> torch.Tensor | None:
        """``0.01 * ||I - V||^2`` (AdapterHub's pull of the value matrix to identity)."""
        if self.value is None:
            return None
        weight = self.value.weight
        eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return 0.01 * (eye - weight).pow(2).sum()
