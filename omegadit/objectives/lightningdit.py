"""LightningDiT's flow matching (Yao, Yang & Wang 2025, arXiv:2501.01423; its transport is SiT's, Ma et al. 2024)
expressed in OmegaDiT's time convention (t = 1 noise, t = 0 data).

LightningDiT's time s runs the other way: s = 0 is noise, s = 1 data, x_s = s x + (1 - s) eps, and the network is
given s and predicts dx_s/ds = x - eps. With t = 1 - s the network is given 1 - t, and our velocity dx_t/dt = eps - x
is minus its output. Training draws s logit-normal (its use_lognorm; our 'lognormal' weighting is the same law,
which is symmetric under t <-> 1 - t) and adds the velocity direction loss 1 - cos(prediction, target) over channels
to the MSE (its use_cosine_loss).

Sampling (its inference.py): Euler on the ODE over the grid s_i = linspace(0, 1, N), shifted as
s <- k s / (1 + (k - 1) s) with timestep_shift k (0.3: more steps near noise), so N - 1 network evaluations;
guidance on the first 3 channels only, and only where s >= cfg_interval_start. In our time the shift is
t <- t / (t + k (1 - t)), the SD3 shift (Esser et al. 2024, eq. 23) with the fixed factor 1 / k, on linspace(1, 0, N),
and the guidance interval is t <= 1 - cfg_interval_start: OmegaDiT's 'euler' sampler with num_steps = N - 1 and
GuidedNetwork(channels=3, interval=(0, 1 - cfg_interval_start)).
"""
import torch
import torch.nn.functional as F

from omegadit.objectives import OBJECTIVES
from omegadit.objectives.base import ObjectiveOutput, mean_flat
from omegadit.objectives.flow import FlowMatching

GUIDED_CHANNELS = 3
# ImageNet 256 inference settings of the released LightningDiT-XL/1 (800 epochs, FID 1.35).
RELEASED_SAMPLING = dict(num_sampling_steps=250, cfg_scale=6.7, cfg_interval_start=0.125, timestep_shift=0.3)


def timestep_shift(t: torch.Tensor, factor: float) -> torch.Tensor:
    """LightningDiT's timestep shift in our time: t / (t + factor (1 - t)). Fixed points 0 and 1 (exactly); a
    factor below 1 moves times towards the noise end (t = 1)."""
    return t / (t + factor * (1 - t))


@OBJECTIVES.register("lightningdit-flow")
class LightningDiTFlow(FlowMatching):
    """Linear-path velocity regression in LightningDiT's time and sign conventions (see the module docstring).

    weighting: 'lognormal' (logit-normal times, its use_lognorm) or 'uniform'. direction_loss: add the term
    'direction', the per-sample mean of 1 - cosine similarity between prediction and target over channels.
    timestep_shift: the factor of the sampling-time shift (training times are not shifted).
    """

    name = "lightningdit-flow"
    default_sampler = "euler"

    def __init__(self, weighting="lognormal", direction_loss=True, timestep_shift=RELEASED_SAMPLING["timestep_shift"]):
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {timestep_shift}")
        super().__init__(path_type="linear", weighting=weighting, time_shifting=False)
        self.config = dict(weighting=weighting, direction_loss=direction_loss, timestep_shift=timestep_shift)
        self.direction_loss = direction_loss
        self.timestep_shift = timestep_shift
        self.term_names = ("denoise", "direction") if direction_loss else ("denoise",)

    def __call__(self, model, x0, model_kwargs=None, generator=None, time_input=None, noise=None) -> ObjectiveOutput:
        """One training pass on data x0 (N, C, H, W); times (ours, 1 = noise) and noise are drawn unless given.
        prediction and target are in the network's convention (target x0 - noise); `time` is ours."""
        model_kwargs = model_kwargs or {}
        broadcast = (x0.shape[0],) + (1,) * (x0.ndim - 1)
        if time_input is None:
            time_input = self.sample_time(broadcast, device=x0.device, generator=generator)
        t = time_input.reshape(broadcast).to(device=x0.device, dtype=x0.dtype)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        target = x0 - noise
        prediction, aux = model((1 - t) * x0 + t * noise, self.network_time(t.flatten()), **model_kwargs)
        terms = {"denoise": mean_flat((prediction - target) ** 2)}
        if self.direction_loss:
            cosine = F.cosine_similarity(prediction.float(), target.float(), dim=1)
            terms["direction"] = mean_flat(1 - cosine)
        return ObjectiveOutput(terms, prediction, target, t, aux)

    def network_time(self, t):
        """LightningDiT's time: 1 - t (1 = data)."""
        return 1 - t

    def velocity(self, output, x, t):
        """Our velocity dx_t/dt: minus the network's (data - noise)."""
        return -output

    def sampling_times(self, num_steps: int, stochastic: bool, shift_dim: int = 1) -> list:
        """FlowMatching's grids (num_steps + 1 times from 1 to 0) with `timestep_shift` applied; the shift does
        not depend on the resolution, so shift_dim is not used."""
        times = torch.tensor(super().sampling_times(num_steps, stochastic), dtype=torch.float64)
        return timestep_shift(times, self.timestep_shift).tolist()


def guidance_interval(cfg_interval_start: float) -> tuple:
    """GuidedNetwork's interval (our time) for LightningDiT's cfg_interval_start (guidance where s >= start)."""
    if not 0.0 <= cfg_interval_start <= 1.0:
        raise ValueError(f"cfg_interval_start must lie in [0, 1], got {cfg_interval_start}")
    return (0.0, 1.0 - cfg_interval_start)


def sampling_settings(num_sampling_steps: int = RELEASED_SAMPLING["num_sampling_steps"],
                      cfg_scale: float = RELEASED_SAMPLING["cfg_scale"],
                      cfg_interval_start: float = RELEASED_SAMPLING["cfg_interval_start"]) -> dict:
    """OmegaDiT's sampler name, step count and GuidedNetwork options equivalent to LightningDiT's inference
    settings (its num_sampling_steps counts grid points, so one more than Euler steps)."""
    if num_sampling_steps < 2:
        raise ValueError(f"num_sampling_steps counts grid points and must be >= 2, got {num_sampling_steps}")
    return dict(sampler="euler", num_steps=num_sampling_steps - 1, scale=cfg_scale,
                interval=guidance_interval(cfg_interval_start), channels=GUIDED_CHANNELS)
