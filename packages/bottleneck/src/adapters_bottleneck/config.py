"""Bottleneck adapter configs with AdapterHub's names, fields and defaults.

`BnConfig` is the general config; the presets are its subclasses with other defaults:
`SeqBnConfig` (Pfeiffer et al., 2020), `DoubleSeqBnConfig` (Houlsby et al., 2019), `ParBnConfig`
(He et al., 2021), `AdapterPlusConfig` (Steitz & Roth, 2024), the invertible variants
`SeqBnInvConfig` / `DoubleSeqBnInvConfig` and the PHM variants `CompacterConfig` /
`CompacterPlusPlusConfig` (Mahabadi et al., 2021).

Every field is honoured by the modules in `adapters_bottleneck.layer` or refused with
`ConfigError`; none is silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from adapters.plugin import ACTIVATIONS, AdapterConfig, ConfigError

#: Activation names accepted for ``non_linearity`` (lower-case; transformers' names).
NON_LINEARITIES = tuple(ACTIVATIONS)
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby", "lora")
SCALING_MODES = ("learned", "channel")
INV_ADAPTERS = ("nice", "glow")
PHM_C_INIT = ("normal", "uniform")
HYPERCOMPLEX_INIT = ("phm", "glorot-normal", "glorot-uniform", "normal")


class LayerFactors(dict):
    """A per-layer ``reduction_factor`` mapping (``{"1": 8, "default": 16}``) that can be hashed,
    so that configs holding one stay hashable. Keys are layer indices as strings or
    ``"default"``."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def factor_for(self, layer: int) -> float:
        """The factor of layer ``layer`` (its own entry, else ``"default"``)."""
        if str(layer) in self:
            return self[str(layer)]
        if "default" in self:
            return self["default"]
        raise ConfigError(
            f"reduction_factor={dict(self)!r} has no entry for layer {layer} and no 'default'; "
            "add one, e.g. {'1': 8, 'default': 16}"
        )


@dataclass(frozen=True)
class BnConfig(AdapterConfig):
    """A bottleneck adapter: ``up(act(down(x))) * scaling`` added at the attention and/or
    feed-forward sub-block of each layer.

    Args:
        mh_adapter: an adapter after each layer's self-attention sub-block.
        output_adapter: an adapter after each layer's feed-forward sub-block.
        reduction_factor: hidden size / bottleneck size; a number, or a mapping from layer index
            (as a string) to a number with a ``"default"`` entry: ``{"1": 8, "default": 16}``.
            A factor below 1 makes an up-projection.
        non_linearity: activation between down and up projection (``"relu"``, ``"swish"``...).
        original_ln_before: the adapter reads the sub-block output after the model's residual
            add and norm (Pfeiffer); False: it reads the sub-block output itself.
        original_ln_after: the model's own residual add and norm follow the adapter; False:
            the adapter's output replaces them (AdapterPlus).
        ln_before / ln_after: a new LayerNorm before the down projection / after the adapter.
        init_weights: ``"bert"`` (normal 0.02, zero bias), ``"mam_adapter"`` (down
            kaiming-uniform, up zero), ``"houlsby"`` (truncated normal 0.01, zero bias) or
            ``"lora"`` (down kaiming-uniform, up zero, zero biases).
        init_weights_seed: every adapter module starts from the weights drawn with this seed
            (the global random state is not touched).
        is_parallel: a parallel adapter (He et al.): reads the sub-block's residual input and
            adds its output beside the sub-block's.
        scaling: a number, ``"learned"`` (one learned scalar) or ``"channel"`` (a learned
            vector of the hidden width), multiplying the adapter's output.
        use_gating: a learned sigmoid gate (mean over the sequence) multiplies the output.
        residual_before_ln: the adapter's residual is the sub-block output before the model's
            norm (True), after it (False), or after the model's residual add (``"post_add"``).
        adapter_residual_before_ln: with ``ln_after``, add the residual before that norm.
        inv_adapter: ``"nice"`` or ``"glow"``: an invertible adapter on the input embeddings,
            inverted before the output embeddings (LM head); None: none.
        inv_adapter_reduction_factor: reduction factor inside the invertible adapter.
        cross_adapter: an adapter after each layer's cross-attention sub-block (models whose
            interface names ``layer_cross_attn``).
        leave_out: layer indices (0-based, over all stacks) that get no adapter.
        dropout: dropout on the adapter's output.
        phm_layer: down and up projections are PHM layers (Compacter).
        phm_dim: number of Kronecker summands ``n`` (divides the widths).
        factorized_phm_W: each ``W_i`` is a rank-``phm_rank`` product ``W_left @ W_right``.
        shared_W_phm: one set of ``W`` shared by all layers of the adapter.
        shared_phm_rule: one set of rule matrices ``A_i`` shared by all layers of the adapter.
        factorized_phm_rule: each rule matrix is an outer product ``left @ right``.
        phm_c_init: ``"normal"`` or ``"uniform"`` initialisation of the rule matrices.
        phm_init_range: the std (normal) of the rule matrices and of ``W`` for ``"normal"``.
        learn_phm: the rule matrices are trained (False: kept fixed).
        hypercomplex_nonlinearity: initialisation of ``W``: ``"glorot-uniform"``,
            ``"glorot-normal"``, ``"normal"`` or ``"phm"`` (as glorot-normal).
        phm_rank: rank of the factorised ``W``.
        phm_bias: PHM layers have a bias.
        stochastic_depth: in training, drop the adapter's output for a whole example with this
            probability (survivors scaled by ``1 / (1 - p)``).

    Example::

        model.add_adapter("task", config=SeqBnConfig(reduction_factor=8))
        model.add_adapter("task2", config="seq_bn[reduction_factor=8, leave_out=[0]]")
    """

    method: ClassVar[str] = "bottleneck"

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | Mapping[str, float]
    non_linearity: str

    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: tuple[int, ...] = ()
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "leave_out", _layer_list(self, "leave_out", self.leave_out))
        object.__setattr__(self, "reduction_factor", _reduction(self, self.reduction_factor))
        if isinstance(self.scaling, int) and not isinstance(self.scaling, bool):
            object.__setattr__(self, "scaling", float(self.scaling))
        self._validate()

    # -- validation ----------------------------------------------------------------------
    def _fail(self, field_name: str, expected: str) -> ConfigError:
        value = getattr(self, field_name)
        return ConfigError(f"{type(self).__name__}.{field_name}={value!r}: {expected}")

    def _validate(self) -> None:
        for name in (
            "mh_adapter",
            "output_adapter",
            "original_ln_before",
            "original_ln_after",
            "ln_before",
            "ln_after",
            "is_parallel",
            "use_gating",
            "adapter_residual_before_ln",
            "cross_adapter",
            "phm_layer",
            "factorized_phm_W",
            "shared_W_phm",
            "shared_phm_rule",
            "factorized_phm_rule",
            "learn_phm",
            "phm_bias",
        ):
            if not isinstance(getattr(self, name), bool):
                raise self._fail(name, "must be True or False")
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter) and not (
            self.inv_adapter
        ):
            raise ConfigError(
                f"{type(self).__name__} adds nothing: mh_adapter, output_adapter, cross_adapter "
                "and inv_adapter are all off; enable at least one"
            )
        if not isinstance(self.non_linearity, str) or (
            self.non_linearity.lower() not in NON_LINEARITIES
        ):
            raise self._fail("non_linearity", f"expected one of {', '.join(NON_LINEARITIES)}")
        if self.init_weights not in INIT_WEIGHTS:
            raise self._fail("init_weights", f"expected one of {list(INIT_WEIGHTS)}")
        if self.init_weights_seed is not None and not _is_int(self.init_weights_seed):
            raise self._fail("init_weights_seed", "must be an integer or None")
        if isinstance(self.scaling, str):
            if self.scaling not in SCALING_MODES:
                raise self._fail(
                    "scaling", "expected a number, 'learned' (a scalar) or 'channel' (a vector)"
                )
        elif not _is_number(self.scaling):
            raise self._fail("scaling", "expected a number, 'learned' or 'channel'")
        if self.residual_before_ln not in (True, False, "post_add") or (
            not isinstance(self.residual_before_ln, bool) and self.residual_before_ln != "post_add"
        ):
            raise self._fail("residual_before_ln", "expected True, False or 'post_add'")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise self._fail(
                "residual_before_ln",
                "'post_add' takes the residual after the model's residual add, which only "
                "happens before the adapter with original_ln_before=True; set that too",
            )
        if self.adapter_residual_before_ln and not self.ln_after:
            raise self._fail(
                "adapter_residual_before_ln",
                "only has a meaning with ln_after=True (it orders the residual and that norm)",
            )
        if self.is_parallel:
            if self.original_ln_before:
                raise self._fail(
                    "original_ln_before",
                    "a parallel adapter reads the sub-block's input, not the normed output; "
                    "set original_ln_before=False (or is_parallel=False)",
                )
            if self.adapter_residual_before_ln:
                raise self._fail(
                    "adapter_residual_before_ln", "a parallel adapter has no own residual"
                )
            if not self.original_ln_after:
                raise self._fail(
                    "original_ln_after",
                    "a parallel adapter's output is added beside the sub-block's, so the "
                    "model's residual add must follow; set original_ln_after=True",
                )
        if self.inv_adapter is not None:
            if self.inv_adapter not in INV_ADAPTERS:
                raise self._fail("inv_adapter", f"expected None or one of {list(INV_ADAPTERS)}")
            factor = self.inv_adapter_reduction_factor
            if not _is_number(factor) or not factor >= 1:
                raise self._fail(
                    "inv_adapter_reduction_factor",
                    "an invertible adapter needs a reduction factor >= 1 (e.g. 2): its subnets "
                    "are at most half the hidden size wide",
                )
        elif self.inv_adapter_reduction_factor is not None:
            raise self._fail(
                "inv_adapter_reduction_factor",
                "is set but inv_adapter is None; set inv_adapter='nice' or 'glow', or drop it",
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise self._fail("dropout", "must be a number in [0, 1)")
        if not _is_number(self.stochastic_depth) or not 0.0 <= self.stochastic_depth < 1.0:
            raise self._fail("stochastic_depth", "must be a number in [0, 1)")
        if not _is_int(self.phm_dim) or self.phm_dim < 1:
            raise self._fail("phm_dim", "must be an integer >= 1")
        if not _is_int(self.phm_rank) or self.phm_rank < 1:
            raise self._fail("phm_rank", "must be an integer >= 1")
        if self.phm_c_init not in PHM_C_INIT:
            raise self._fail("phm_c_init", f"expected one of {list(PHM_C_INIT)}")
        if not _is_number(self.phm_init_range) or self.phm_init_range <= 0:
            raise self._fail("phm_init_range", "must be a number > 0")
        if self.hypercomplex_nonlinearity not in HYPERCOMPLEX_INIT:
            raise self._fail(
                "hypercomplex_nonlinearity", f"expected one of {list(HYPERCOMPLEX_INIT)}"
            )
        if self.shared_W_phm and not self.phm_layer:
            raise self._fail("shared_W_phm", "only applies to PHM layers; set phm_layer=True")
        if self.shared_W_phm and isinstance(self.reduction_factor, LayerFactors):
            raise self._fail(
                "shared_W_phm",
                "one W shared by all layers needs one bottleneck size: use a single "
                "reduction_factor, not a per-layer mapping",
            )

    # -- helpers -------------------------------------------------------------------------
    def factor_for(self, layer: int) -> float:
        """The reduction factor of layer ``layer``."""
        if isinstance(self.reduction_factor, LayerFactors):
            return self.reduction_factor.factor_for(layer)
        return self.reduction_factor

    def locations(self) -> tuple[str, ...]:
        """The sub-blocks adapted: a subset of ``("mh_adapter", "cross_adapter",
        "output_adapter")``."""
        flags = (
            ("mh_adapter", self.mh_adapter),
            ("cross_adapter", self.cross_adapter),
            ("output_adapter", self.output_adapter),
        )
        return tuple(name for name, on in flags if on)

    def uses_layer(self, index: int) -> bool:
        """Whether layer ``index`` gets this adapter."""
        return index not in self.leave_out


@dataclass(frozen=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward sub-block, reading the output
    of the model's own residual add and norm."""

    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping[str, float] = 16


@dataclass(frozen=True)
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++ (Mahabadi et al., 2021): `SeqBnConfig` with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | Mapping[str, float] = 32
    non_linearity: str = "gelu"


@dataclass(frozen=True)
class SeqBnInvConfig(SeqBnConfig):
    """`SeqBnConfig` plus a NICE invertible adapter on the input embeddings (MAD-X)."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after the attention and the feed-forward sub-blocks."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | Mapping[str, float] = 16


@dataclass(frozen=True)
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter (Mahabadi et al., 2021): `DoubleSeqBnConfig` with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | Mapping[str, float] = 32
    non_linearity: str = "gelu"


@dataclass(frozen=True)
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """`DoubleSeqBnConfig` plus a NICE invertible adapter on the input embeddings."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(frozen=True)
class ParBnConfig(BnConfig):
    """He et al. (2021): a parallel adapter beside the feed-forward sub-block, scaled by 4."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping[str, float] = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclass(frozen=True)
class AdapterPlusConfig(BnConfig):
    """AdapterPlus (Steitz & Roth, 2024): after the feed-forward sub-block's norm, with a
    learned channel-wise scaling, Houlsby initialisation and stochastic depth 0.1; its output
    replaces the model's following residual add and norm (``original_ln_after=False``)."""

    original_ln_after: bool = False
    original_ln_before: bool = True
    residual_before_ln: bool | str = False
    stochastic_depth: float = 0.1
    init_weights: str = "houlsby"
    scaling: float | str = "channel"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | Mapping[str, float] = 96
    non_linearity: str = "gelu"


# AdapterHub's older class names.
PfeifferConfig = SeqBnConfig
HoulsbyConfig = DoubleSeqBnConfig
ParallelConfig = ParBnConfig
PfeifferInvConfig = SeqBnInvConfig
HoulsbyInvConfig = DoubleSeqBnInvConfig
#: AdapterHub's names of the same classes (``adapters.PfeifferConfig`` resolves through them).
CLASS_ALIASES = {
    "PfeifferConfig": SeqBnConfig,
    "HoulsbyConfig": DoubleSeqBnConfig,
    "ParallelConfig": ParBnConfig,
    "PfeifferInvConfig": SeqBnInvConfig,
    "HoulsbyInvConfig": DoubleSeqBnInvConfig,
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _layer_list(config: BnConfig, name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(
            f"{type(config).__name__}.{name}={value!r} must be a list of layer indices, e.g. [0, 1]"
        )
    values = tuple(value)
    if not all(_is_int(i) and i >= 0 for i in values):
        raise ConfigError(
            f"{type(config).__name__}.{name}={value!r} must hold layer indices (integers >= 0)"
        )
    return values


def _reduction(config: BnConfig, value: Any) -> float | LayerFactors:
    name = type(config).__name__
    if isinstance(value, Mapping):
        factors = LayerFactors()
        for key, factor in value.items():
            text = str(key)
            if text != "default" and not text.isdigit():
                raise ConfigError(
                    f"{name}.reduction_factor has key {key!r}; keys are layer indices ('0', "
                    "'1', ...) or 'default'"
                )
            if not _is_number(factor) or not factor >= 1:
                raise ConfigError(
                    f"{name}.reduction_factor[{key!r}]={factor!r} must be a number >= 1 (the "
                    "bottleneck is hidden size / reduction_factor wide: at most the hidden size)"
                )
            factors[text] = factor
        if not factors:
            raise ConfigError(f"{name}.reduction_factor={{}} is empty; give at least 'default'")
        return factors
    if not _is_number(value) or not value >= 1:
        raise ConfigError(
            f"{name}.reduction_factor={value!r} must be a number >= 1 (the bottleneck is hidden "
            "size / reduction_factor wide: at most the hidden size, as LoRA's r is at most the "
            "projection's width) or a mapping {'<layer>': factor, 'default': factor}"
        )
    return value


PRESETS: dict[str, BnConfig] = {
    "seq_bn": SeqBnConfig(),
    "pfeiffer": SeqBnConfig(),
    "double_seq_bn": DoubleSeqBnConfig(),
    "houlsby": DoubleSeqBnConfig(),
    "par_bn": ParBnConfig(),
    "parallel": ParBnConfig(),
    "scaled_par_bn": ParBnConfig(scaling="learned"),
    "scaled_parallel": ParBnConfig(scaling="learned"),
    "adapterplus": AdapterPlusConfig(),
    "seq_bn_inv": SeqBnInvConfig(),
    "pfeiffer+inv": SeqBnInvConfig(),
    "double_seq_bn_inv": DoubleSeqBnInvConfig(),
    "houlsby+inv": DoubleSeqBnInvConfig(),
    "compacter": CompacterConfig(),
    "compacter++": CompacterPlusPlusConfig(),
}

CONFIG_CLASSES: tuple[type[BnConfig], ...] = (
    BnConfig,
    SeqBnConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    AdapterPlusConfig,
    SeqBnInvConfig,
    DoubleSeqBnInvConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
)
