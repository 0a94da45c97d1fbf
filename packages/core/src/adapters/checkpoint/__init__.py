"""Saving and loading adapters.

This library's format (``format_version`` 2) is a directory per adapter:

- ``adapter_config.json``: ``{"format": "adapters", "format_version": 2, "name", "method",
  "config", "interface", "versions"}``
- ``adapter_model.safetensors``: the adapter's tensors under *portable* keys: the keys the
  method's plugin gives (module paths such as ``model.layers.0.self_attn.q_proj.lora_A``) made
  relative to the base model the interface describes (``layers.0.self_attn.q_proj.lora_A``),
  so that an adapter saved on ``LlamaForCausalLM`` loads on ``LlamaModel`` and back. Keys of
  modules outside the base model (a head) keep their full path behind ``top:``.
- ``adapters_manifest.json``: the name, size and sha256 of every file of the save. A load reads
  only files it lists and parses exactly the bytes whose sha256 it checked: a folder whose
  files do not match it (a mix of two saves, a file changed by hand), a cut manifest or a link
  leading out of the folder is refused.

Every save is atomic as a set (`adapters.checkpoint.atomic`): the files are written into a
sibling temporary folder that is swapped with the target in one ``renameat2(RENAME_EXCHANGE)``
on Linux (else renamed in after the old folder is renamed away); entries of the old folder
that no save of ours owns (dot-files, ``.git``, a README, sub-folders) are carried over
unchanged. Concurrent saves into one folder end with one complete save; a reader during a save
gets the old or the new one (it reads again when the folder was swapped meanwhile). Loading
never unpickles and never runs code from a checkpoint.

Version 1 checkpoints (adapters 0.1: keys from the top-level model, no manifest) still load;
newer format versions are refused with the upgrade to install. Foreign formats (PEFT,
AdapterHub) are read and written by `CheckpointFormat`s that plugins register;
``load_adapter`` picks the right one by inspecting the directory.
"""
