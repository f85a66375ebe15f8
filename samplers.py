"""Samplers for velocity-prediction models: Euler-Maruyama SDE, Euler and Heun ODE, with classifier-free guidance.

Time runs from t = 1 (noise) to t = 0 (data). Models follow the SiT signature `model(x, t, y, uncond=False)
-> (velocity, extras)`. The integration state is float32 whatever the model's precision (autocast is the
caller's business); times are Python floats from a float64 grid computed on the host, so no step syncs the device.
"""
from typing import Optional, Sequence, Union

import torch

from loss import interpolant, time_shift

SDE_LAST_TIME = 0.04
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def time_grid(num_steps: int, stochastic: bool, time_shifting: bool = False, shift_dim: int = 1,
              shift_base: int = 4096) -> list:
    """num_steps + 1 decreasing times from 1 to 0.

    SDE (stochastic=True, as OmegaDiT): linspace(1, 0.04, num_steps) then 0; the last interval is a deterministic
    step. ODE: linspace(1, 0, num_steps + 1). With time_shifting, every time goes through `loss.time_shift`
    (SD3, Esser et al. 2024), the same shift as in training; 0 and 1 stay fixed.
    """
    if num_steps < 1:
        raise ValueError(f"samplers.py: num_steps must be >= 1, got {num_steps}")
    if stochastic:
        t = torch.cat([torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64)])
    else:
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if time_shifting:
        t = time_shift(t, shift_dim, shift_base)
    return t.tolist()


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """Score of p_t from the velocity (SiT, Ma et al. 2024, sec. 2, score-velocity relation):
    score = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma). Undefined at t = 0 on the cosine path."""
    alpha, sigma, d_alpha, d_sigma = (float(c) for c in interpolant(torch.tensor(t, dtype=torch.float64), path_type))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """Reverse-time SDE drift v - 1/2 w_t score with diffusion coefficient w_t = g^2 = 2t (SiT, Ma et al. 2024,
    sec. 2, reverse SDE with a free diffusion coefficient; OmegaDiT's choice of w_t)."""
    return v - t * score_from_velocity(v, x, t, path_type)


def guided_velocity(model, x: torch.Tensor, t: float, y, cfg_scale: float = 1.0, y_null=None,
                    path_drop: bool = False) -> torch.Tensor:
    """Velocity at (x, t) in float32 with classifier-free guidance v_u + w (v_c - v_u) (Ho & Salimans 2022, eq. 6).

    w == 1 is a single conditional call. Otherwise the conditional and unconditional halves go through the model
    in one batched call, the unconditional half with y_null and, when path_drop, per-sample uncond flags
    [False] * N + [True] * N. Guiding the velocity equals guiding the SDE drift, which is affine in v.
    """
    n = x.shape[0]
    if cfg_scale == 1.0:
        v, _ = model(x, torch.full((n,), t, device=x.device), y=y)
        return v.float()
    kwargs = {}
    if path_drop:
        kwargs["uncond"] = torch.cat([torch.zeros(n, device=x.device), torch.ones(n, device=x.device)]).bool()
    v, _ = model(torch.cat([x, x]), torch.full((2 * n,), t, device=x.device), y=torch.cat([y, y_null]), **kwargs)
    v_cond, v_uncond = v.float().chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def gaussian_noise(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn with `generator`: None (global RNG), one torch.Generator, or a
    sequence of one generator per sample (samples then do not depend on how they were batched)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if len(generator) != x.shape[0]:
        raise ValueError(f"samplers.py: {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], device=x.device, dtype=x.dtype, generator=g) for g in generator])


def _setup(model, latents, y, num_steps, cfg_scale, y_null, time_shifting, shift_base, stochastic):
    """Float32 initial state, time grid and the batched null condition."""
    x = latents.float()
    times = time_grid(num_steps, stochastic, time_shifting, latents[0].numel(), shift_base)
    if cfg_scale != 1.0:
        if y_null is None:
            if not hasattr(model, "null_condition"):
                raise ValueError("samplers.py: cfg_scale != 1 needs y_null (the null caption embedding or class) "
                                 "or a model with null_condition(batch_size, device)")
            y_null = model.null_condition(x.shape[0], x.device)
        if y_null.shape[0] == 1 and x.shape[0] > 1:
            y_null = y_null.expand(x.shape[0], *y_null.shape[1:])
        if y_null.shape[0] != x.shape[0]:
            raise ValueError(f"samplers.py: y_null has batch size {y_null.shape[0]}, latents have {x.shape[0]}")
    return x, times, y_null


def _velocity_field(model, y, cfg_scale, guidance_low, guidance_high, y_null, path_drop):
    """(x, t) -> guided velocity, guidance active only for guidance_low <= t <= guidance_high."""
    def velocity(x, t):
        w = cfg_scale if guidance_low <= t <= guidance_high else 1.0
        return guided_velocity(model, x, t, y, w, y_null, path_drop)
    return velocity


@torch.no_grad()
def euler_maruyama_sampler(model, latents, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                           path_type="linear", y_null=None, path_drop=False, time_shifting=False, shift_base=4096,
                           generator: Generators = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [v - 1/2 g^2 score] dt + g dW, g^2 = 2t (SiT, Ma et al. 2024, sec. 2).

    Grid `time_grid(num_steps, stochastic=True)`: num_steps - 1 stochastic steps
    x <- x + drift dt + sqrt(g^2) sqrt(|dt|) eps from t = 1 to 0.04, then one deterministic step to t = 0.
    num_steps model evaluations (x2 batch inside the guidance interval). Noise is drawn on the latents' device
    with `generator` (see `gaussian_noise`: global RNG, one generator, or one per sample). Returns float32
    latents at t = 0.
    """
    x, times, y_null = _setup(model, latents, y, num_steps, cfg_scale, y_null, time_shifting, shift_base, True)
    velocity = _velocity_field(model, y, cfg_scale, guidance_low, guidance_high, y_null, path_drop)
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        x_next = x + sde_drift(velocity(x, t_cur), x, t_cur, path_type) * dt
        if i < num_steps - 1:
            x_next = x_next + (2 * t_cur) ** 0.5 * abs(dt) ** 0.5 * gaussian_noise(x, generator)
        x = x_next
    return x


@torch.no_grad()
def euler_sampler(model, latents, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  path_type="linear", y_null=None, path_drop=False, time_shifting=False, shift_base=4096,
                  generator: Generators = None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dt = v(x, t) over `time_grid(num_steps, stochastic=False)`
    (linspace(1, 0, num_steps + 1), shifted if asked): num_steps model evaluations. Deterministic; `generator`
    and `path_type` are accepted for a common signature and unused. Returns float32 latents at t = 0."""
    x, times, y_null = _setup(model, latents, y, num_steps, cfg_scale, y_null, time_shifting, shift_base, False)
    velocity = _velocity_field(model, y, cfg_scale, guidance_low, guidance_high, y_null, path_drop)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    return x


@torch.no_grad()
def heun_sampler(model, latents, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                 path_type="linear", y_null=None, path_drop=False, time_shifting=False, shift_base=4096,
                 generator: Generators = None) -> torch.Tensor:
    """Heun's second-order method on dx/dt = v(x, t) (Karras et al. 2022, Algorithm 1) over the ODE grid.

    As in Karras et al., the last step (to t = 0) is a plain Euler step, so the model is never evaluated at t = 0:
    2 num_steps - 1 model evaluations. Deterministic; `generator` and `path_type` are unused.
    Returns float32 latents at t = 0.
    """
    x, times, y_null = _setup(model, latents, y, num_steps, cfg_scale, y_null, time_shifting, shift_base, False)
    velocity = _velocity_field(model, y, cfg_scale, guidance_low, guidance_high, y_null, path_drop)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur)
        x_next = x + dt * v_cur
        if t_next > 0:
            x_next = x + dt * 0.5 * (v_cur + velocity(x_next, t_next))
        x = x_next
    return x


SAMPLERS = {"sde": euler_maruyama_sampler, "euler": euler_sampler, "heun": heun_sampler}
