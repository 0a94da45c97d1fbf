"""What a plugin declares to core: `MethodSpec` (a method) and `CheckpointFormat` (a foreign
checkpoint format). Plugins build them in their registration hooks
(`adapters.hookspecs.adapters_register_methods`,
`adapters.hookspecs.adapters_register_checkpoint_formats`); core owns the fields it fills in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .configs import AdapterConfig


@dataclass
class MethodSpec:
    """What a plugin declares about one method (see `hookspecs.adapters_register_methods`).

    Attributes:
        name: the method name users list in ``AdapterModelInterface.adapter_methods``. Owned:
            no other plugin may declare it; ``"union"`` is reserved by core.
        config_classes: config classes of this method; the first is the canonical one used by
            ``AdapterConfig.from_dict`` for ``{"method": name, ...}``. Every class sets
            ``method = name``; class names are owned too (``adapters.<ClassName>`` resolves
            to them).
        presets: preset names → config instances (``"lora"``, ``"ia3"``, ...). Owned. The
            first preset is the method's default (``adapters demo`` uses it).
        compositions: composition block classes this method supports (``Stack``,
            ``BatchSplit``, ``Average``, ...). ``Parallel`` is supported whenever ``BatchSplit``
            is, because core implements it by batch replication.
        can_merge: whether ``merge_adapter`` / ``reset_adapter`` work for this method.
        class_aliases: more names ``adapters.<Name>`` resolves to, for config classes known
            under another name (AdapterHub's ``PfeifferConfig`` is ``SeqBnConfig``): ``{alias:
            one of config_classes}``. Owned like class names. (New in contract 1.1.)
        upgrade_key: ``upgrade_key(config, key, format_version) -> key``: for methods whose
            checkpoint keys changed, the current name of a key saved in an older checkpoint
            format (core calls it when loading format 1; keys come without the ``"<method>/"``
            prefix of a union). None: keys never changed.
        distribution / version / plugin: filled in by core when the plugin is registered
            (the distribution and its version for an entry point, ``None`` for an in-process
            plugin; ``plugin`` is the registered plugin's name).
    """

    name: str
    config_classes: tuple[type[AdapterConfig], ...]
    presets: dict[str, AdapterConfig] = field(default_factory=dict)
    compositions: tuple[type, ...] = ()
    can_merge: bool = False
    class_aliases: dict[str, type[AdapterConfig]] = field(default_factory=dict)
    upgrade_key: Callable[[AdapterConfig, str, int], str] | None = None
    distribution: str | None = None
    version: str | None = None
    plugin: str | None = None


@dataclass
class CheckpointFormat:
    """A foreign checkpoint format a plugin can read and/or write.

    Attributes:
        name: short name used in ``save_adapter(..., format=name)`` (``"peft"``). Owned: for
            every method when ``methods`` is empty, else for the methods it lists (see
            ``methods``).
        detect: ``detect(path) -> bool``: whether this format reads directory ``path``. Must
            not raise (return False for anything it does not recognise).
        read: ``read(path, model, sites, config) -> (config, state_dict)``: the adapter's config
            (``config`` is the user's override or None) and its tensors under this library's
            name-independent keys (as returned by `adapters_add_adapter`).
        write: ``write(path, model, sites, name, config, state_dict)``: write the adapter in this
            format into the (empty, temporary) directory ``path``; None if read-only.
        plugin: filled in by core: the name of the plugin that registered the format.
        detect_fusion / read_fusion / write_fusion: the same for fusion layers
            (``load_adapter_fusion`` / ``save_adapter_fusion(..., format=name)``), all optional:
            ``detect_fusion(path) -> bool``; ``read_fusion(path, model, sites) -> (name or
            None, adapter_names, config, state_dict)`` with ``config`` anything
            ``add_adapter_fusion`` accepts and tensors under the keys your
            ``adapters_add_fusion`` produces; ``write_fusion(path, model, sites, name, children,
            config, state_dict)``. (New in contract 1.0.)
        methods: the methods whose adapters (and fusion layers) this format reads and writes;
            empty (the default): any method, and the name is this format's alone. Two plugins
            may register one name for disjoint ``methods`` (AdapterHub's format is served by
            adapters-lora for ``"lora"`` and by adapters-bottleneck for ``"bottleneck"``):
            ``save_adapter(..., format=name)`` uses the one that lists the adapter's method,
            ``load_adapter`` the one whose ``detect`` claims the directory, and a reader's
            config must be of a listed method. A name claimed for a method another plugin's
            format with that name already serves (or by a format without ``methods``) is a
            conflict: the plugin is refused. (New in contract 1.0.)
        aliases: more names ``save_adapter(..., format=...)`` accepts for this format, owned
            like ``name`` (e.g. a format's former name). (New in contract 1.0.)
        saved_name: ``saved_name(path) -> str or None``: the adapter name the directory
            records (AdapterHub's ``"name"``), which ``load_adapter`` uses when no
            ``load_as`` is given (else the folder's name); optional, must not raise
            (`adapters.checkpoint.readers.recorded_name` reads a JSON field). (New in contract 1.0.)
        write_options: names of keyword options ``save_adapter(..., format=name, **options)``
            and ``save_adapter_fusion`` accept for this format; core passes them to ``write``
            / ``write_fusion`` as keyword arguments and refuses any other option with
            `CheckpointError` before writing. (New in contract 1.0.)
    """

    name: str
    detect: Callable[[str], bool]
    read: Callable[..., tuple[AdapterConfig, dict[str, Any]]]
    write: Callable[..., None] | None = None
    plugin: str | None = None
    detect_fusion: Callable[[str], bool] | None = None
    read_fusion: Callable[..., tuple[str | None, list[str], Any, dict[str, Any]]] | None = None
    write_fusion: Callable[..., None] | None = None
    methods: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    write_options: tuple[str, ...] = ()
    saved_name: Callable[[str], str | None] | None = None

    def names(self) -> tuple[str, ...]:
        """``name`` and the ``aliases``."""
        return (self.name, *self.aliases)

    def serves(self, method: str) -> bool:
        """Whether this format reads and writes adapters of ``method``."""
        return not self.methods or method in self.methods
