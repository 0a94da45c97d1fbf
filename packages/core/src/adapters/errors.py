"""Exception types raised by adapters. Each message names the bad value, what was expected and
the fix."""

from __future__ import annotations


class AdaptersError(Exception):
    """Base class of every error this library raises on purpose."""


class InterfaceError(AdaptersError, ValueError):
    """An `AdapterModelInterface` is malformed or does not match the model."""


class InterfacePathError(InterfaceError):
    """A dotted path of the interface does not resolve in the model.

    Attributes: ``field`` (interface field), ``value`` (the path), ``where`` (module path it was
    looked up in), ``suggestion`` (closest child name or None), ``children`` (available names).
    """

    def __init__(
        self,
        field: str,
        value: str,
        where: str,
        missing: str,
        children: list[str],
        suggestion: str | None,
    ) -> None:
        self.field, self.value, self.where = field, value, where
        self.children, self.suggestion = children, suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        shown = ", ".join(children) if children else "(none)"
        detail = f" (no child {missing!r})" if missing != value else ""
        super().__init__(
            f"{field}={value!r} not found in {where or '<model>'}{detail}{hint} children: {shown}"
        )


class ConfigError(AdaptersError, ValueError):
    """An adapter config (object, string or file) is invalid."""


class MethodNotInstalledError(AdaptersError, ImportError):
    """A config or method needs a plugin distribution that is not installed."""


class PluginError(AdaptersError):
    """A plugin cannot be registered: it breaks the plugin contract (`adapters.hookspecs`).

    The registry is left as it was before the plugin was offered."""


class PluginContractError(PluginError):
    """A plugin declares no contract version, or one this adapters-core cannot serve."""


class PluginConflictError(PluginError):
    """A plugin claims a method, preset, config class or checkpoint-format name that another
    loaded plugin already owns."""


class CompositionError(AdaptersError, ValueError):
    """An adapter setup cannot be run: unknown adapter, unsupported block or nesting."""


class AdapterNotFoundError(AdaptersError, ValueError):
    """No adapter of the given name has been added to the model."""


class CheckpointError(AdaptersError, ValueError):
    """A checkpoint directory is missing, corrupt, or does not match the model."""


class NotInitializedError(AdaptersError, TypeError):
    """The model has not been prepared with `adapters.init`."""
