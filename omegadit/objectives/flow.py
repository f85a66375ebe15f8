"""Flow matching with velocity prediction (SiT, Ma et al. 2024): the OmegaDiT objective.

Paths interpolate data x (t = 0) and noise eps (t = 1): x_t = alpha_t x + sigma_t eps; the network predicts the
velocity d/dt x_t = alpha'_t x + sigma'_t eps and is given t itself.
"""
import math
from typing import Optional

import torch

from omegadit.objectives import OBJECTIVES
from omegadit.objectives.base import Objective, ObjectiveOutput, mean_flat

PATH_TYPES = ("linear", "cosine")
TIME_WEIGHTINGS = ("uniform", "lognormal")
DEFAULT_SHIFT_BASE = 4096
SDE_LAST_TIME = 0.04


def time_shift(t: torch.Tensor, shift_dim: int, shift_base: int = DEFAULT_SHIFT_BASE) -> torch.Tensor:
    """Resolution-dependent time shift (SD3, Esser et al. 2024, sec. 5.3.2, eq. 23).

    s = sqrt(shift_dim / shift_base); t <- s t / (1 + (s - 1) t), clamped to [0, 1]. Fixed points 0 and 1;
    s > 1 moves times towards the noise end (t = 1).
    """
    shift = math.sqrt(shift_dim / shift_base)
    return torch.clamp(shift * t / (1 + (shift - 1) * t), 0.0, 1.0)


def interpolant(t: torch.Tensor, path_type: str = "linear"):
    """(alpha_t, sigma_t, alpha'_t, sigma'_t) of the path: linear (1 - t, t) or cosine (cos(pi t/2), sin(pi t/2))."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t),
            torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"unknown path_type {path_type!r}, expected one of {PATH_TYPES}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}, expected one of {choices}")


@OBJECTIVES.register("flow")
class FlowMatching(Objective):
    """Velocity regression on a linear or cosine path.

    weighting: how training times are drawn, 'uniform' U(0, 1) or 'lognormal' (sigma = exp(N(0, 1)), EDM, Karras
    et al. 2022; t = sigma / (1 + sigma) on the linear path, 2/pi atan(sigma) on the cosine path).
    time_shifting: shift times with `time_shift`, shift_dim = C*H*W of the input, in training and sampling.
    The defaults are OmegaDiT's (train.py passes only the options given to it).
    """

    name = "flow"
    family = "flow"
    default_sampler = "sde"
    term_names = ("denoise",)

    def __init__(self, path_type="linear", weighting="uniform", time_shifting=True,
                 shift_base=DEFAULT_SHIFT_BASE):
        _check_choice("path_type", path_type, PATH_TYPES)
        _check_choice("weighting", weighting, TIME_WEIGHTINGS)
        super().__init__(path_type=path_type, weighting=weighting, time_shifting=time_shifting,
                         shift_base=shift_base)
        self.path_type = path_type
        self.weighting = weighting
        self.time_shifting = time_shifting
        self.shift_base = shift_base

    def sample_time(self, shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Raw training times in [0, 1] (before shifting), drawn per `weighting`."""
        if self.weighting == "uniform":
            return torch.rand(shape, device=device, generator=generator)
        sigma = torch.randn(shape, device=device, generator=generator).exp()
        if self.path_type == "linear":
            return sigma / (1 + sigma)
        return 2 / math.pi * torch.atan(sigma)

    def shift(self, t: torch.Tensor, shift_dim: int) -> torch.Tensor:
        """Times after the resolution shift (unchanged without time_shifting)."""
        return time_shift(t, shift_dim, self.shift_base) if self.time_shifting else t

    def __call__(self, model, x0, model_kwargs=None, generator=None, time_input=None, noise=None) -> ObjectiveOutput:
        """One training pass on data x0 (N, C, H, W); raw times and noise are drawn (with `generator`) unless
        given. Term: 'denoise', the per-sample velocity MSE."""
        model_kwargs = model_kwargs or {}
        broadcast = (x0.shape[0],) + (1,) * (x0.ndim - 1)
        if time_input is None:
            time_input = self.sample_time(broadcast, device=x0.device, generator=generator)
        t = self.shift(time_input.reshape(broadcast), x0[0].numel()).to(device=x0.device, dtype=x0.dtype)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(t, self.path_type)
        target = d_alpha_t * x0 + d_sigma_t * noise
        prediction, aux = model(alpha_t * x0 + sigma_t * noise, t.flatten(), **model_kwargs)
        return ObjectiveOutput({"denoise": mean_flat((prediction - target) ** 2)}, prediction, target, t, aux)

    def network_time(self, t):
        return t

    def sampling_times(self, num_steps: int, stochastic: bool, shift_dim: int = 1) -> list:
        """num_steps + 1 decreasing times from 1 to 0 (host floats from a float64 grid: no device syncs).

        SDE (stochastic=True, as OmegaDiT): linspace(1, 0.04, num_steps) then 0; the last interval is a
        deterministic step. ODE: linspace(1, 0, num_steps + 1). Shifted as in training.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if stochastic:
            t = torch.cat([torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64),
                           torch.zeros(1, dtype=torch.float64)])
        else:
            t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return self.shift(t, shift_dim).tolist()

    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The velocity d/dt x_t from the network output (it is the velocity)."""
        return output

    def score(self, velocity: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """Score of p_t from the velocity (SiT, Ma et al. 2024, sec. 2):
        (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma). Undefined at t = 0 on the cosine path."""
        coefficients = interpolant(torch.tensor(t, dtype=torch.float64), self.path_type)
        alpha, sigma, d_alpha, d_sigma = (float(c) for c in coefficients)
        ratio = alpha / d_alpha
        return (ratio * velocity - x) / (sigma ** 2 - ratio * d_sigma * sigma)
