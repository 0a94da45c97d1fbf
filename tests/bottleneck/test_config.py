"""Bottleneck configs: AdapterHub's names, fields and defaults; every bad value refused."""

from __future__ import annotations

import dataclasses

import pytest

from adapters import AdapterConfig
from adapters.configs import resolve_config
from adapters.errors import ConfigError
from adapters_bottleneck import (
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    ParBnConfig,
    SeqBnConfig,
    SeqBnInvConfig,
)

# AdapterHub adapters 1.3.0's defaults (configuration/adapter_config.py), field by field.
AH_BASE_DEFAULTS = dict(
    original_ln_before=False,
    original_ln_after=True,
    ln_before=False,
    ln_after=False,
    init_weights="bert",
    init_weights_seed=None,
    is_parallel=False,
    scaling=1.0,
    use_gating=False,
    residual_before_ln=True,
    adapter_residual_before_ln=False,
    inv_adapter=None,
    inv_adapter_reduction_factor=None,
    cross_adapter=False,
    leave_out=(),
    dropout=0.0,
    phm_layer=False,
    phm_dim=4,
    factorized_phm_W=True,
    shared_W_phm=False,
    shared_phm_rule=True,
    factorized_phm_rule=False,
    phm_c_init="normal",
    phm_init_range=0.0001,
    learn_phm=True,
    hypercomplex_nonlinearity="glorot-uniform",
    phm_rank=1,
    phm_bias=True,
    stochastic_depth=0.0,
)
AH_PRESETS = {
    "seq_bn": (
        SeqBnConfig,
        dict(
            original_ln_before=True,
            mh_adapter=False,
            output_adapter=True,
            non_linearity="relu",
            reduction_factor=16,
        ),
    ),
    "double_seq_bn": (
        DoubleSeqBnConfig,
        dict(mh_adapter=True, output_adapter=True, non_linearity="swish", reduction_factor=16),
    ),
    "par_bn": (
        ParBnConfig,
        dict(
            output_adapter=True,
            mh_adapter=False,
            non_linearity="relu",
            reduction_factor=2,
            init_weights="mam_adapter",
            is_parallel=True,
            scaling=4.0,
        ),
    ),
    "scaled_par_bn": (
        ParBnConfig,
        dict(is_parallel=True, scaling="learned", reduction_factor=2, init_weights="mam_adapter"),
    ),
    "adapterplus": (
        AdapterPlusConfig,
        dict(
            original_ln_after=False,
            original_ln_before=True,
            residual_before_ln=False,
            stochastic_depth=0.1,
            init_weights="houlsby",
            scaling="channel",
            reduction_factor=96,
            non_linearity="gelu",
        ),
    ),
    "seq_bn_inv": (
        SeqBnInvConfig,
        dict(inv_adapter="nice", inv_adapter_reduction_factor=2, original_ln_before=True),
    ),
    "double_seq_bn_inv": (
        DoubleSeqBnInvConfig,
        dict(inv_adapter="nice", inv_adapter_reduction_factor=2, mh_adapter=True),
    ),
    "compacter": (
        CompacterConfig,
        dict(phm_layer=True, reduction_factor=32, non_linearity="gelu", mh_adapter=True),
    ),
    "compacter++": (
        CompacterPlusPlusConfig,
        dict(
            phm_layer=True,
            reduction_factor=32,
            non_linearity="gelu",
            mh_adapter=False,
            original_ln_before=True,
        ),
    ),
}
ALIASES = {
    "pfeiffer": "seq_bn",
    "houlsby": "double_seq_bn",
    "parallel": "par_bn",
    "scaled_parallel": "scaled_par_bn",
    "pfeiffer+inv": "seq_bn_inv",
    "houlsby+inv": "double_seq_bn_inv",
}


@pytest.mark.parametrize("preset", sorted(AH_PRESETS))
def test_presets_have_adapterhub_defaults(preset):
    cls, specific = AH_PRESETS[preset]
    config = resolve_config(preset)
    assert type(config) is cls
    for name, value in {**AH_BASE_DEFAULTS, **specific}.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_adapterhub_aliases_resolve(alias):
    assert resolve_config(alias) == resolve_config(ALIASES[alias])


def test_fields_are_exactly_adapterhubs():
    names = {f.name for f in dataclasses.fields(BnConfig)}
    assert names == set(AH_BASE_DEFAULTS) | {
        "mh_adapter",
        "output_adapter",
        "reduction_factor",
        "non_linearity",
    }


def test_overrides_in_a_preset_string():
    config = resolve_config("pfeiffer+inv[reduction_factor=4, inv_adapter='glow']")
    assert (config.reduction_factor, config.inv_adapter) == (4, "glow")
    config = resolve_config("compacter++[phm_dim=2]")
    assert config.phm_dim == 2


def test_round_trip_through_dict_keeps_class_and_mapping():
    config = SeqBnConfig(reduction_factor={"0": 4, "default": 8}, leave_out=[1])
    again = AdapterConfig.from_dict(config.to_dict())
    assert again == config and type(again) is SeqBnConfig
    assert hash(again) == hash(config)
    assert again.factor_for(0) == 4 and again.factor_for(5) == 8


BAD = [
    ("reduction_factor", 0),
    ("reduction_factor", "16"),
    ("reduction_factor", {"x": 2}),
    ("reduction_factor", {"1": -1}),
    ("non_linearity", "relu6x"),
    ("scaling", "vector"),
    ("scaling", True),
    ("residual_before_ln", "pre_add"),
    ("init_weights", "xavier"),
    ("init_weights_seed", 1.5),
    ("dropout", 1.0),
    ("stochastic_depth", -0.1),
    ("leave_out", "0"),
    ("leave_out", [-1]),
    ("inv_adapter", "real_nvp"),
    ("phm_dim", 0),
    ("phm_rank", 0),
    ("phm_c_init", "zeros"),
    ("phm_init_range", 0),
    ("hypercomplex_nonlinearity", "xavier"),
    ("ln_before", 1),
    ("mh_adapter", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SeqBnConfig(**{field: value})


@pytest.mark.parametrize(
    "changes",
    [
        dict(residual_before_ln="post_add", original_ln_before=False),
        dict(adapter_residual_before_ln=True),
        dict(inv_adapter_reduction_factor=2),
        dict(mh_adapter=False, output_adapter=False),
        dict(shared_W_phm=True),
    ],
)
def test_inconsistent_combinations_are_refused(changes):
    with pytest.raises(ConfigError):
        DoubleSeqBnConfig(**changes)


@pytest.mark.parametrize(
    "changes",
    [dict(original_ln_before=True), dict(original_ln_after=False)],
)
def test_parallel_refuses_sequential_only_options(changes):
    with pytest.raises(ConfigError):
        ParBnConfig(**changes)


def test_unknown_option_names_the_options():
    with pytest.raises(ConfigError, match="reduction_factr"):
        resolve_config("seq_bn[reduction_factr=2]")


@pytest.mark.parametrize(
    "config",
    [
        "seq_bn[reduction_factor=1e-9]",
        "seq_bn[reduction_factor=0.5]",
        "seq_bn[reduction_factor={'default': 1e-9}]",
        "seq_bn_inv[inv_adapter_reduction_factor=1e-9]",
    ],
)
def test_bottleneck_widths_are_bounded_by_the_hidden_size_before_allocating(config):
    """A reduction factor below 1 would make the bottleneck wider than the layer (1e-9: a
    16 TB allocation); refused when the config is made, as LoRA's r and ReFT's rank are."""
    with pytest.raises(ConfigError, match=">= 1"):
        resolve_config(config)
