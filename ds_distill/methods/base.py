"""Method base: the algorithm only (losses, rollouts, which role steps when). No DeepSpeed, no family imports."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ds_distill.adapters.base import DiffusionAdapter
from ds_distill.engines import OptimizerSpec
from ds_distill.roles import RoleBundle, RoleHandle
from ds_distill.utils import faults
from ds_distill.validators.base import ValidationRequest


def default_optimizer_spec(training, total_steps: int) -> OptimizerSpec:
    """A trainable role's optimizer from the recipe's `training` defaults."""
    return OptimizerSpec(
        lr=training.learning_rate,
        betas=tuple(training.betas),
        weight_decay=training.weight_decay,
        eps=training.adam_eps,
        max_grad_norm=training.max_grad_norm,
        lr_scheduler=training.lr_scheduler,
        warmup_steps=training.lr_warmup_steps,
        total_steps=total_steps,
        fused=training.fused_optimizer,
    )


class DistillMethod:
    """A training method. Subclasses set `roles`, `config_class`, and implement `train_one_step`."""

    roles: ClassVar[dict[str, bool]] = {}
    """Role name -> must it be trainable."""
    config_class: ClassVar[type]
    """Dataclass of this method's `method_config` knobs."""

    def __init__(self, bundle: RoleBundle, adapter: DiffusionAdapter, strategy, config: Any, training, pipeline_config):
        self.bundle = bundle
        self.strategy = strategy
        self.adapter = adapter
        self.config = config
        self.training = training
        self.pipeline_config = pipeline_config
        self.seed = training.seed
        self.skipped: list[str] = []
        """What the current step skipped as non-finite (the trainer reads and clears it)."""

    # -- what the builder asks before anything is loaded ------------------------------------------
    @classmethod
    def needs_latents(cls, config) -> bool:
        """Whether the dataset must carry VAE latents."""
        return True

    @classmethod
    def optimizer_spec(cls, role: str, config, training) -> OptimizerSpec:
        """Optimizer and schedule of a trainable role (method knobs may override `training`)."""
        return default_optimizer_spec(training, training.max_train_steps)

    @classmethod
    def check_config(cls, config, training, source: str) -> None:
        """Cross-field checks of the method's knobs (raise RecipeError)."""

    # -- the loop's view ----------------------------------------------------------------------------
    def train_one_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        """One optimizer step (DMD2: one iteration) over this rank's micro-batches; returns scalars by role."""
        raise NotImplementedError

    def validation_request(self) -> ValidationRequest:
        """How the validator should sample the student."""
        raise NotImplementedError

    def validation_role(self) -> RoleHandle:
        """The role whose samples are validated and exported."""
        return self.bundle["student"]

    def state_dict(self) -> dict:
        """Method state beyond the engines (saved in client state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

    def extra_checkpoint_files(self, role_dir_of) -> None:
        """Write per-rank files that are not part of any engine (e.g. EMA partitions)."""

    def load_extra_checkpoint_files(self, role_dir_of) -> None:
        """Read what `extra_checkpoint_files` wrote."""

    def update(self, role: RoleHandle, loss: torch.Tensor, step: int, micro: int = 0, last: bool = True) -> bool:
        """Backward of one micro-batch (`micro` of the step; `last` closes the step with the optimizer step) -- or
        neither, on every rank, when the loss or the gradient is non-finite on any rank: then the whole step is
        skipped (gradients of its earlier micro-batches dropped, DeepSpeed's accumulation boundaries kept), weights
        and optimizer state never see a non-finite update, and the caller stops feeding this step's micro-batches.
        Returns whether the step goes on (or, at `last`, was taken)."""
        if faults.armed("nan_loss", step) or faults.armed(f"nan_loss_micro{micro}", step):
            loss = loss * float("nan")
        if not self.strategy.all_finite(loss.detach()):
            self.skipped.append(f"{role.name} loss")
            self.strategy.skip_step(role.engine)
            return False
        self.adapter.backward(role, loss)
        if not last:  # non-finite gradients survive accumulation: checked once, at the boundary
            self.strategy.step(role.engine)
            return True
        if faults.armed("nan_grad", step):
            self.strategy.corrupt_grads(role.engine)
        # DeepSpeed's ZeRO-3 step takes the all-reduced global gradient norm and, when it is not finite, leaves
        # weights, optimizer state and LR schedule alone on every rank: ask it instead of scanning the gradients again
        if not self.strategy.step(role.engine):
            self.skipped.append(f"{role.name} gradient")
            return False
        return True

    @staticmethod
    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean squared error in fp32."""
        return torch.nn.functional.mse_loss(a.float(), b.float())
