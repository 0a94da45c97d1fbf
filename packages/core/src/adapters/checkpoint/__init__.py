"""Saving and loading adapters.

This library's format (``format_version`` 2) is a directory per adapter:

- ``adapter_config.json``: ``{"format": "adapters", "format_version": 2, "name", "method",
  "config", "interface", "versions"}``
- ``adapter_model.safetensors``: the adapter's tensors under *portable* keys: the keys the
  method's plugin gives (module paths such as ``model.layers.0.self_attn.q_proj.lora_A``) made
  relative to the base model the interface describes (``layers.0.self_attn.q_proj.lora_A``),
  so that an adapter saved on ``LlamaForCausalLM`` loads on ``LlamaModel`` and back. Keys of
  modules outside the base model (a head) keep their full path behind ``top:``.
- ``adapters_manifest.json``: the name, size and sha256 of every file of the save. A folder
  whose files do not match it (a mix of two saves, a file changed by hand) is refused.

Every save is atomic as a set: the files are written into a sibling temporary folder that then
replaces the target with ``rename`` (the old folder is removed afterwards; files in it that no
save of ours wrote, such as a README, are carried over). Concurrent saves into one folder end
with one complete save. Loading never unpickles and never runs code from a checkpoint.

Version 1 checkpoints (adapters 0.1: keys from the top-level model, no manifest) still load;
newer format versions are refused with the upgrade to install. Foreign formats (PEFT,
AdapterHub) are read and written by `CheckpointFormat`s that plugins register;
``load_adapter`` picks the right one by inspecting the directory.
"""
