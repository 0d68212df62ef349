"""Roles: a model tagged with its name, its DeepSpeed engine and whether it trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ds_distill.errors import RecipeError


@dataclass
class RoleHandle:
    """One role: `module` is the (ZeRO-3 partitioned) transformer, `engine` the DeepSpeed engine owning it."""

    name: str
    module: torch.nn.Module
    trainable: bool
    engine: Any = None
    family: str = "wan"
    extra: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        """Forward through the engine when this role trains (its loss hooks), else the bare module."""
        if self.trainable and self.engine is not None and torch.is_grad_enabled():
            return self.engine(*args, **kwargs)
        return self.module(*args, **kwargs)


class RoleBundle:
    """The roles of a run, by name."""

    def __init__(self, roles: dict[str, RoleHandle]):
        self.roles = dict(roles)

    def __getitem__(self, name: str) -> RoleHandle:
        return self.roles[name]

    def __contains__(self, name: str) -> bool:
        return name in self.roles

    def __iter__(self):
        return iter(self.roles.values())

    def names(self) -> list[str]:
        """Role names in recipe order."""
        return list(self.roles)

    def trainable(self) -> list[RoleHandle]:
        """Roles that get an optimizer."""
        return [r for r in self.roles.values() if r.trainable]


def require_roles(role_specs: dict, required: dict[str, bool], method: str, source: str) -> None:
    """Check a recipe's roles against what a method needs: `required` maps role -> must be trainable.

    Missing roles and trainable flags that do not match are one-line recipe errors; extra roles are allowed
    only if the method lists them.
    """
    for name, must_train in required.items():
        if name not in role_specs:
            have = ", ".join(role_specs) or "none"
            raise RecipeError(f"{source}: roles.{name}: method `{method}` needs role `{name}` (recipe has: {have})")
        trainable = role_specs[name].trainable
        if trainable != must_train:
            want = "trainable: true" if must_train else "trainable: false (it is frozen)"
            raise RecipeError(f"{source}: roles.{name}.trainable: method `{method}` requires {want}")
    extra = [n for n in role_specs if n not in required]
    if extra:
        raise RecipeError(
            f"{source}: roles.{extra[0]}: method `{method}` does not use role `{extra[0]}` "
            f"(it uses: {', '.join(required)})"
        )
