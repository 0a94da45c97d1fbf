"""The runtime behind the model API: private to adapters-core, no plugin imports it.

- model API and lifecycle: `api` (the methods ``init`` gives a model), `initialization`
  (``init``, ``load_model``), `lifecycle` (``merge_and_unload``), `state` (what core keeps on a
  model), `naming`, `precision`, `rollback` (undo of a failed operation);
- sites: `resolution` (interface paths to `adapters.sites`), `geometry` (attention shapes);
- forward pass: `forward` (the model-level hooks that open the forward context), `selection`
  (``adapter_names=``), `multitask` (``task_ids=``), `recompute` (activation checkpointing),
  `signature`;
- features: `fusion`, `embeddings`, `averaging`.
"""
