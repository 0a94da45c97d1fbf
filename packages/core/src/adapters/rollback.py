"""Rollback of a failed operation: a record of a model's module tree and hooks."""

from __future__ import annotations

from torch import nn


class Snapshot:
    """Records a model's module tree and hooks so a failed operation can be rolled back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = {id(m): dict(m._modules) for m in model.modules()}
        self.modules = list(model.modules())
        self.hooks = {
            id(m): (
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(getattr(m, "_forward_hooks_with_kwargs", {})),
                dict(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
                dict(getattr(m, "_forward_hooks_always_called", {})),
            )
            for m in self.modules
        }
        self.params = {id(m): dict(m._parameters) for m in self.modules}

    def restore(self) -> None:
        for m in self.modules:
            m._modules.clear()
            m._modules.update(self.children[id(m)])
            m._parameters.clear()
            m._parameters.update(self.params[id(m)])
            fwd, pre, fwd_kw, pre_kw, always = self.hooks[id(m)]
            for attr, saved in (
                ("_forward_hooks", fwd),
                ("_forward_pre_hooks", pre),
                ("_forward_hooks_with_kwargs", fwd_kw),
                ("_forward_pre_hooks_with_kwargs", pre_kw),
                ("_forward_hooks_always_called", always),
            ):
                current = getattr(m, attr, None)
                if current is not None:
                    current.clear()
                    current.update(saved)
