"""Epsilon prediction on a discrete variance-preserving schedule, as U-ViT trains its latent models.

Bao et al. 2023 (U-ViT, arXiv:2209.12152) train on Stable Diffusion's discrete schedule (Rombach et al. 2022):
betas = linspace(sqrt(0.00085), sqrt(0.012), N)^2, N = 1000, abar_n = prod_{i <= n} (1 - beta_i). A training
step draws n uniformly from 1..N and noise eps, forms x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, gives the
network x_n and n, and regresses eps (mean squared error, the simple loss of Ho et al. 2020).

Objective time is t = n / N (1 = noise); the network is given N t, i.e. n itself. For samplers, the schedule is
also the continuous one of DPM-Solver's discrete NoiseScheduleVP (Lu et al. 2022, arXiv:2206.00927, appendix):
log alpha_t is piecewise linear in t between the knots (n / N, log sqrt(abar_n)), extended linearly beyond them;
sigma_t = sqrt(1 - alpha_t^2) and lambda_t = log(alpha_t / sigma_t). Objectives of the family 'vp-eps' provide
`marginal_log_mean_coeff`, `marginal_std`, `marginal_lambda`, `inverse_lambda`, `sampling_range` and `eps`
(omegadit/sampling/dpm_solver.py uses them).
"""
import math
from typing import Optional

import torch

from omegadit.objectives import OBJECTIVES
from omegadit.objectives.base import Objective, ObjectiveOutput, mean_flat


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """Stable Diffusion's 'scaled linear' betas, float64: linspace(sqrt(beta_start), sqrt(beta_end), N)^2."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def interpolate(x: float, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """The piecewise-linear function through (xs, ys), xs increasing, at x; linear beyond the end knots."""
    i = int(torch.searchsorted(xs, torch.tensor(x, dtype=xs.dtype)).clamp(1, len(xs) - 1))
    x0, x1, y0, y1 = float(xs[i - 1]), float(xs[i]), float(ys[i - 1]), float(ys[i])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@OBJECTIVES.register("uvit-eps")
class DiscreteEpsilon(Objective):
    """Epsilon MSE on the scaled-linear discrete schedule with n uniform in 1..N (U-ViT); term 'denoise'."""

    name = "uvit-eps"
    family = "vp-eps"
    default_sampler = "dpm-solver"
    term_names = ("denoise",)

    def __init__(self, num_timesteps=1000, beta_start=0.00085, beta_end=0.012):
        super().__init__(num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end)
        self.num_timesteps = num_timesteps
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.knot_times = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        self.knot_log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
        self._device_tables = {}

    def alphas_cumprod_on(self, device) -> torch.Tensor:
        """abar_1..abar_N on `device`, copied there once (a copy per step would stall the training loop)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = self.alphas_cumprod.to(device)
        return self._device_tables[device]

    def sample_steps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(batch,) discrete timesteps n drawn uniformly from 1..N."""
        return torch.randint(1, self.num_timesteps + 1, (batch,), device=device, generator=generator)

    def __call__(self, model, x0, model_kwargs=None, generator=None, steps=None, noise=None) -> ObjectiveOutput:
        """One training pass on x0 (N, C, H, W): timesteps n and noise are drawn (with `generator`) unless given;
        the network gets n itself (network_time(n / N) up to rounding)."""
        model_kwargs = model_kwargs or {}
        if steps is None:
            steps = self.sample_steps(x0.shape[0], device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        broadcast = (x0.shape[0],) + (1,) * (x0.ndim - 1)
        abar = self.alphas_cumprod_on(x0.device)[steps - 1].reshape(broadcast)
        x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)
        prediction, aux = model(x_t, steps.to(x0.dtype), **model_kwargs)
        terms = {"denoise": mean_flat((prediction.float() - noise.float()) ** 2)}
        return ObjectiveOutput(terms, prediction, noise, (steps / self.num_timesteps).reshape(broadcast), aux)

    def network_time(self, t):
        """The timestep the network takes: N t (n for t = n / N)."""
        return t * self.num_timesteps

    def sampling_range(self) -> tuple:
        """(T, t_0): samplers integrate from t = 1 down to the first knot 1 / N (U-ViT's eps = 1 / N)."""
        return 1.0, 1.0 / self.num_timesteps

    def marginal_log_mean_coeff(self, t: float) -> float:
        """log alpha_t."""
        return interpolate(t, self.knot_times, self.knot_log_alphas)

    def marginal_std(self, t: float) -> float:
        """sigma_t = sqrt(1 - alpha_t^2)."""
        return math.sqrt(-math.expm1(2 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: float) -> float:
        """lambda_t = log(alpha_t / sigma_t), the half log signal-to-noise ratio."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * math.log(-math.expm1(2 * log_alpha))

    def inverse_lambda(self, lam: float) -> float:
        """The time t with marginal_lambda(t) = lam."""
        a = -2.0 * lam
        log_alpha = -0.5 * (max(a, 0.0) + math.log1p(math.exp(-abs(a))))
        return interpolate(log_alpha, self.knot_log_alphas.flip(0), self.knot_times.flip(0))

    def eps(self, output: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The noise prediction from the network output (it is the noise prediction)."""
        return output
