"""Contract 1.1 moved core's modules (runtime under ``adapters._runtime``, checkpoint I/O under
``adapters.checkpoint``, plugin loading under ``adapters.registry``, tools under
``adapters.tools``); every import path of contract 1.0 keeps working."""

import importlib
import subprocess
import sys

import pytest

import adapters  # noqa: F401  (installs the finder of the old paths)
from adapters._moved import MOVED

#: The public names of contract 1.0's ``adapters.saving`` (before the 1.1 split).
SAVING_1_0 = [
    "CONFIG_NAME", "WEIGHTS_NAME", "MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "SETUP_NAME",
    "ADAPTERS_SUBDIR", "TOP_PREFIX", "check_format_version", "base_model_prefix",
    "to_portable_keys", "from_portable_keys", "write_manifest", "read_manifest",
    "verify_manifest", "name_problem_of_path", "write_directory_atomically",
    "write_adapter_files", "save_adapter", "writer_for", "check_write_options",
    "save_all_adapters", "read_checkpoint", "read_json_object", "recorded_name",
    "read_json_strict", "load_tensor_file", "read_json", "load_safetensors", "load_adapter",
    "load_tensors", "load_all_adapters", "base_state_dict", "save_pretrained",
    "read_saved_model_folder", "active_setup_of", "AVERAGE_IGNORED_FIELDS",
    "configs_equal_for_average",
]  # fmt: skip


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_moved_module_itself(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_from_import_of_an_old_path_gives_the_same_objects():
    from adapters._runtime.rollback import record_undo as new_record_undo
    from adapters.plugins import get_registry
    from adapters.registry import get_registry as new_get_registry
    from adapters.rollback import record_undo

    assert record_undo is new_record_undo and get_registry is new_get_registry


def test_the_split_saving_module_still_has_every_name_of_contract_1_0():
    saving = importlib.import_module("adapters.saving")
    missing = [name for name in SAVING_1_0 if not hasattr(saving, name)]
    assert missing == []
    from adapters.checkpoint.readers import load_tensor_file

    assert saving.load_tensor_file is load_tensor_file


def test_sites_still_serves_resolution_names_of_contract_1_0():
    from adapters._runtime.geometry import positional_kind as new_positional_kind
    from adapters._runtime.resolution import resolve_sites as new_resolve_sites
    from adapters.sites import positional_kind, resolve_sites

    assert resolve_sites is new_resolve_sites and positional_kind is new_positional_kind
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        importlib.import_module("adapters.sites").nothing_here  # noqa: B018


def test_an_unknown_module_under_adapters_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("adapters.no_such_module")


def test_python_dash_m_adapters_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "adapters", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "plugins" in result.stdout
