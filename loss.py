"""Training objective: flow matching with v-prediction, REPA projection loss and contrastive flow matching.

Paths interpolate data x (t=0) and noise eps (t=1): x_t = alpha_t * x + sigma_t * eps, and the model predicts the
velocity d/dt x_t = alpha'_t * x + sigma'_t * eps (SiT, Ma et al. 2024, sec. 3).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

PATH_TYPES = ("linear", "cosine")
TIME_WEIGHTINGS = ("uniform", "lognormal")
CFM_WEIGHTINGS = ("uniform", "linear")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def time_shift(t: torch.Tensor, shift_dim: int, shift_base: int = 4096) -> torch.Tensor:
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
    raise ValueError(f"loss.py: unknown path_type {path_type!r}, expected one of {PATH_TYPES}")


def projection_loss(zs, zs_tilde) -> torch.Tensor:
    """REPA loss (Yu et al. 2024, sec. 3.2): negative cosine similarity between projector outputs and encoder
    features, averaged over tokens, encoders and batch."""
    if len(zs) == 0 or len(zs) != len(zs_tilde):
        raise ValueError(f"loss.py: {len(zs)} target encoder features but the model returned "
                         f"{len(zs_tilde)} projector outputs")
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        cosine = (F.normalize(z, dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)
        total = total - cosine.mean()
    return total / len(zs)


class LossOutput(NamedTuple):
    """Loss parts: denoising (N,), proj (scalar), cfm (scalar), time (N,1,1,1) actually used (after shifting)."""
    denoising: torch.Tensor
    proj: torch.Tensor
    cfm: torch.Tensor
    time: torch.Tensor

    def total(self, proj_coeff: float = 0.0, cfm_coeff: float = 0.0) -> torch.Tensor:
        """Scalar training loss: mean(denoising) + proj_coeff * proj + cfm_coeff * cfm."""
        return self.denoising.mean() + proj_coeff * self.proj + cfm_coeff * self.cfm


class SILoss:
    """Stochastic-interpolant loss of OmegaDiT: flow matching + REPA projection + contrastive flow matching.

    weighting: how training times are drawn, 'uniform' U(0, 1) or 'lognormal' (sigma = exp(N(0, 1)), EDM, Karras
    et al. 2022; t = sigma / (1 + sigma) on the linear path, 2/pi atan(sigma) on the cosine path).
    cfm_weighting: contrastive flow matching (Stoica et al. 2025) term -mean |v - v_other|^2, 'uniform' or
    'linear' (each element weighted by its time t).
    apply_time_shift: shift times with `time_shift`, shift_dim = C*H*W of the images.
    """

    def __init__(self, prediction="v", path_type="linear", weighting="uniform", cfm_weighting="uniform",
                 apply_time_shift=False, shift_base=4096):
        if prediction != "v":
            raise ValueError(f"loss.py: only prediction='v' is supported, got {prediction!r}")
        if path_type not in PATH_TYPES:
            raise ValueError(f"loss.py: unknown path_type {path_type!r}, expected one of {PATH_TYPES}")
        if weighting not in TIME_WEIGHTINGS:
            raise ValueError(f"loss.py: unknown weighting {weighting!r}, expected one of {TIME_WEIGHTINGS}")
        if cfm_weighting not in CFM_WEIGHTINGS:
            raise ValueError(f"loss.py: unknown cfm_weighting {cfm_weighting!r}, expected one of {CFM_WEIGHTINGS}")
        self.prediction = prediction
        self.path_type = path_type
        self.weighting = weighting
        self.cfm_weighting = cfm_weighting
        self.apply_time_shift = apply_time_shift
        self.shift_base = shift_base

    def sample_time(self, shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Raw training times in [0, 1] (before shifting), drawn per `weighting`."""
        if self.weighting == "uniform":
            return torch.rand(shape, device=device, generator=generator)
        sigma = torch.randn(shape, device=device, generator=generator).exp()
        if self.path_type == "linear":
            return sigma / (1 + sigma)
        return 2 / math.pi * torch.atan(sigma)

    def __call__(self, model, images, model_kwargs=None, zs=None, time_input=None, noises=None,
                 generator: Optional[torch.Generator] = None) -> LossOutput:
        """Loss on a batch of images (N, C, H, W). time_input (raw, before shifting) and noises are drawn on the
        images' device (with `generator` if given) when None. zs: target encoder features (N, tokens, z_dim)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        zs = [] if zs is None else zs
        broadcast = (images.shape[0],) + (1,) * (images.ndim - 1)
        if time_input is None:
            time_input = self.sample_time(broadcast, device=images.device, generator=generator)
        time_input = time_input.reshape(broadcast)
        if self.apply_time_shift:
            time_input = time_shift(time_input, images[0].numel(), self.shift_base)
        time_input = time_input.to(device=images.device, dtype=images.dtype)
        if noises is None:
            noises = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)

        alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(time_input, self.path_type)
        model_input = alpha_t * images + sigma_t * noises
        model_target = d_alpha_t * images + d_sigma_t * noises
        model_output, zs_tilde = model(model_input, time_input.flatten(), **model_kwargs)

        denoising = mean_flat((model_output - model_target) ** 2)
        proj = projection_loss(zs, zs_tilde) if len(zs) else model_output.new_zeros(())
        cfm_error = (model_output - torch.roll(model_target, shifts=1, dims=0)) ** 2
        if self.cfm_weighting == "linear":
            cfm_error = cfm_error * time_input
        cfm = -cfm_error.mean()
        return LossOutput(denoising, proj, cfm, time_input)
