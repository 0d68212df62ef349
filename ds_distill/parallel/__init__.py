"""Sequence parallelism (DeepSpeed-Ulysses): how ranks form groups, which sizes are valid, and a switch.

Ranks form groups of `sp_size` consecutive ranks. Inside a group every rank holds the same samples and computes
the same loss; each keeps one slice of the token sequence through the transformer blocks. Data parallelism runs
across groups (size world / sp_size); ZeRO-3 still partitions parameters over all ranks. The model wiring lives
in the family (`ds_distill.models.wan_ulysses` for Wan): methods never see it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from ds_distill.errors import RecipeError


@dataclass
class SequenceParallel:
    """This rank's place in the sequence-parallel layout, the group's process group, and whether the installed
    wiring is active (`paused()` turns it off, e.g. for validation, where ranks may hold different prompts)."""

    size: int
    rank: int
    world_size: int
    group: Any = None
    """Process group of this rank's SP group (None when size is 1)."""
    enabled: bool = field(default=True)

    @property
    def sp_rank(self) -> int:
        """Position inside the SP group: which slice of the tokens this rank keeps."""
        return self.rank % self.size

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: the SP group's index (what the loader shards by)."""
        return self.rank // self.size

    @property
    def dp_size(self) -> int:
        """Number of data-parallel groups (world / sp_size)."""
        return self.world_size // self.size

    @property
    def active(self) -> bool:
        return self.size > 1 and self.enabled

    @contextlib.contextmanager
    def paused(self):
        """Inside the block every rank runs whole sequences on its own (no communication in the model)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before


def valid_sp_sizes(world_size: int, heads: int, tokens: int | None) -> list[int]:
    """Every sp_size that divides the world size, the head count and (when known) the token count."""
    common = math.gcd(world_size, heads) if tokens is None else math.gcd(math.gcd(world_size, heads), tokens)
    return [n for n in range(1, common + 1) if common % n == 0]


def check_sp_size(sp_size: int, world_size: int, heads: int, tokens: int | None, source: str,
                  tokens_from: str = "") -> None:
    """One line naming training.sp_size, what it fails to divide, and the valid values."""
    valid = ", ".join(str(n) for n in valid_sp_sizes(world_size, heads, tokens))
    key = f"{source}: training.sp_size: {sp_size}"
    if sp_size < 1:
        raise RecipeError(f"{key} must be at least 1 (valid here: {valid})")
    if world_size % sp_size:
        raise RecipeError(f"{key} does not divide the world size {world_size} (valid here: {valid})")
    if heads % sp_size:
        raise RecipeError(f"{key} does not divide the model's {heads} attention heads (valid here: {valid})")
    if tokens is not None and tokens % sp_size:
        raise RecipeError(f"{key} does not divide the {tokens} tokens of a sample{tokens_from} (valid here: {valid})")


def check_recipe_layout(recipe, components: dict, generated: tuple | None, dataset=None) -> None:
    """Preflight: training.sp_size against the launch's world size, every role's head count and the tokens of a
    sample (the generated size, else the data's first latent shape). Reads configs only; writes nothing."""
    import os

    sp_size = recipe.training.sp_size
    if sp_size == 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    heads = math.gcd(*(int(c.transformer_config.get("num_attention_heads", 1)) for c in components.values()))
    main = components["student" if "student" in components else next(iter(components))].transformer_config
    shape, where = generated, " (training.num_frames/height/width)"
    if shape is None and dataset is not None and "vae_latent" in dataset[0]:
        shape = tuple(dataset[0]["vae_latent"].shape)
        where = f" (the data's latents {list(shape)})"
    tokens = None
    if shape is not None:
        patch = list(main.get("patch_size") or (1, 2, 2))[:3]
        tokens = math.prod(n // p for n, p in zip(shape[1:], patch))
    check_sp_size(sp_size, world, heads, tokens, recipe.source, where if tokens is not None else "")
