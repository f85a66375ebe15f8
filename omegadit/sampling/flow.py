"""Samplers for flow objectives: Euler-Maruyama on the reverse SDE, Euler and Heun on the probability-flow ODE.

The integration state is float32 whatever the model's precision (autocast is the caller's business); times are
host floats from the objective's float64 grid, so no step syncs the device.
"""
from typing import Optional, Sequence, Union

import torch

from omegadit.sampling import register_sampler

Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def gaussian_noise(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn with `generator`: None (global RNG), one torch.Generator, or a
    sequence of one generator per sample (samples then do not depend on how they were batched)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], device=x.device, dtype=x.dtype, generator=g) for g in generator])


def _velocity(objective, network, x, t):
    return objective.velocity(network(x, t), x, t)


@register_sampler("sde", families=("flow",))
@torch.no_grad()
def euler_maruyama(objective, network, noise, num_steps=50, generator: Generators = None):
    """Euler-Maruyama on the reverse SDE dx = [v - 1/2 g^2 score] dt + g dW, g^2 = 2t (SiT, Ma et al. 2024,
    sec. 2; OmegaDiT's choice of g). Grid `sampling_times(num_steps, stochastic=True)`: num_steps - 1 stochastic
    steps from t = 1 to 0.04, then one deterministic step to t = 0; num_steps network evaluations."""
    x = noise.float()
    times = objective.sampling_times(num_steps, stochastic=True, shift_dim=x[0].numel())
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        v = _velocity(objective, network, x, t_cur)
        x_next = x + (v - t_cur * objective.score(v, x, t_cur)) * dt
        if i < num_steps - 1:
            x_next = x_next + (2 * t_cur) ** 0.5 * abs(dt) ** 0.5 * gaussian_noise(x, generator)
        x = x_next
    return x


@register_sampler("euler", families=("flow",))
@torch.no_grad()
def euler(objective, network, noise, num_steps=50, generator: Generators = None):
    """Euler on the probability-flow ODE dx/dt = v(x, t) over `sampling_times(num_steps, stochastic=False)`:
    num_steps network evaluations. Deterministic (`generator` is unused)."""
    x = noise.float()
    times = objective.sampling_times(num_steps, stochastic=False, shift_dim=x[0].numel())
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t_cur) * _velocity(objective, network, x, t_cur)
    return x


@register_sampler("heun", families=("flow",))
@torch.no_grad()
def heun(objective, network, noise, num_steps=50, generator: Generators = None):
    """Heun's second-order method on dx/dt = v(x, t) (Karras et al. 2022, Algorithm 1) over the ODE grid; the last
    step (to t = 0) is a plain Euler step, so 2 num_steps - 1 network evaluations. Deterministic."""
    x = noise.float()
    times = objective.sampling_times(num_steps, stochastic=False, shift_dim=x[0].numel())
    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        v_cur = _velocity(objective, network, x, t_cur)
        x_next = x + dt * v_cur
        if t_next > 0:
            x_next = x + dt * 0.5 * (v_cur + _velocity(objective, network, x_next, t_next))
        x = x_next
    return x
