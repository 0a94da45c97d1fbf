"""Tools built on the library, apart from it: the ``adapters`` command (`cli`: ``plugins``,
``demo``, ``convert``), the demos, and `AdapterTrainer` for the transformers ``Trainer``."""
