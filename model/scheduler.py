"""Flow-matching time / noise-level schedule of the reference sampler (MODEL_SPEC §3).

x_t = (1 - sigma) x0 + sigma * noise. The transformer sees the raw time t in [0, T]; the solver uses the
sigma of the nearest entry of a T-entry table, which reproduces the reference's rounding (t = 500 resolves
to table index 499, sigma 0.5005005).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SamplerConfig


@dataclass(frozen=True)
class SolverStep:
    """One Euler step: the times the transformer sees and the noise levels the update uses."""

    t_cur: float  # diffusion time the transformer sees for the frames being denoised
    t_next: float
    sigma_cur: float
    sigma_next: float

    @property
    def is_noop(self) -> bool:
        """A step from t=0 to t=0 changes nothing (the reference still evaluates the transformer)."""
        return self.t_cur == 0 and self.t_next == 0


class FlowMatchSchedule:
    """The reference's step list and sigma table (numpy float64 linspace cast to fp32; nearest sigma)."""

    def __init__(self, cfg: SamplerConfig):
        n = cfg.num_train_timesteps
        self.num_train_timesteps = n
        self.sigmas = torch.linspace(1.0, 0.0, n, dtype=torch.float32)
        self.timesteps = self.sigmas * n
        # nfe - 1 transformer evaluations per block, from pure noise (t = n) down to t = 0. The reference
        # builds this list with numpy's float64 linspace and casts it to fp32 (MODEL_SPEC §3); a float32
        # torch.linspace differs in the last bit for some nfe.
        self.denoising_timesteps = torch.tensor(np.linspace(float(n), 0.0, cfg.nfe - 1).tolist(),
                                                dtype=torch.float32)
        self.steps = self._solver_steps()

    def sigma_of(self, t: float) -> float:
        """sigma of the table entry nearest to t (float64 distance, first index on ties)."""
        distance = (self.timesteps.double() - float(t)).abs()
        return float(self.sigmas[int(torch.argmin(distance))])

    def _solver_steps(self) -> list[SolverStep]:
        ts = [float(t) for t in self.denoising_timesteps]
        steps = []
        for i, t_cur in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else 0.0
            sigma_next = self.sigma_of(t_next) if t_next != 0 else 0.0
            sigma_cur = self.sigma_of(t_cur) if t_cur != 0 else 0.0
            steps.append(SolverStep(t_cur, t_next, sigma_cur, sigma_next))
        return steps

    def effective_steps(self) -> list[SolverStep]:
        """The steps that change the latents (the reference's final t=0 -> 0 call is dropped)."""
        return [s for s in self.steps if not s.is_noop]
