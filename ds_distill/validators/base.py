"""What a method asks of validation; validators are method-agnostic."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass
class ValidationRequest:
    """How to sample the validated role: loop kind, steps (or explicit timesteps) and guidance."""

    sampler_kind: Literal["ode", "sde"] = "ode"
    sampling_steps: Union[int, list[int]] = 50
    """Number of ODE steps, or several counts to validate at each (ignored when sampling_timesteps is given)."""
    sampling_timesteps: Optional[list[int]] = None
    """Explicit raw timesteps in [0, 1000] (SDE few-step samplers), shifted by flow_shift."""
    guidance_scale: float = 1.0
    """Classifier-free guidance; 1 or less runs the conditional branch only."""
    use_ema: bool = False
    """Sample with the EMA weights instead of the live ones."""

    def expand(self) -> list["ValidationRequest"]:
        """One request per sampling schedule: explicit timesteps stay one; a list of step counts becomes one
        request per count."""
        if self.sampling_timesteps is not None or isinstance(self.sampling_steps, int):
            return [self]
        return [dataclasses.replace(self, sampling_steps=int(n)) for n in self.sampling_steps]
