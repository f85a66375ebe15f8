"""DPM-Solver in its data-prediction form (DPM-Solver++), singlestep and multistep, orders 1 to 3.

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps"
(arXiv:2206.00927) and Lu et al. 2022, "DPM-Solver++" (arXiv:2211.01095). In lambda = log(alpha / sigma) the
probability-flow ODE solves exactly up to an integral of the data prediction D(x_lambda, lambda):

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D dlambda,

and expanding D in a Taylor series in lambda - lambda_s gives, with h = lambda_t - lambda_s,
phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:

    x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 D + alpha_t h phi_2 D' - alpha_t h^2 phi_3 D'' + ...

Both methods walk a grid of num_steps + 1 times (uniform in t, U-ViT's choice, or in lambda), one network
evaluation per grid point but the last. 'singlestep' is DPM-Solver-fast as U-ViT's sample scripts run it
(`DPM_Solver(..., predict_x0=True).sample(method='fast', order=3)`): steps of order 3 (order 2 and 1 at the end,
as the evaluations divide) that each span `order` grid intervals and evaluate at the grid points inside, at
lambda_s + r_i h; the derivatives of D come from those evaluations. 'multistep' (DPM-Solver++(2M/3M)) takes one
grid interval per step and reuses the previous steps' evaluations, with lower orders for the first steps.

The objective (family 'vp-eps', e.g. omegadit/objectives/uvit.py) gives the schedule (marginal_log_mean_coeff,
marginal_std, marginal_lambda, inverse_lambda), the time range and the noise prediction from the network output.
The state is float32; schedule values are host floats, so no step syncs the device.
"""
import math

import torch

from omegadit.sampling import register_sampler

METHODS = ("singlestep", "multistep")
SKIPS = ("time_uniform", "logSNR")


def alpha(objective, t):
    """alpha_t, the signal coefficient."""
    return math.exp(objective.marginal_log_mean_coeff(t))


def data_prediction(objective, network, x, t):
    """D(x, t) = (x - sigma_t eps) / alpha_t from the network's noise prediction."""
    eps = objective.eps(network(x, t), x, t)
    return (x - objective.marginal_std(t) * eps) / alpha(objective, t)


def phi_2(h):
    """phi_2(h) = expm1(-h) / h + 1 (the weight of the first derivative of D over a step of h in lambda)."""
    return math.expm1(-h) / h + 1


def first_order_part(objective, x, s, t, d_s):
    """(sigma_t / sigma_s) x_s - alpha_t phi_1 D_s: the step with D held at its value at s (DDIM)."""
    h = objective.marginal_lambda(t) - objective.marginal_lambda(s)
    ratio = objective.marginal_std(t) / objective.marginal_std(s)
    return ratio * x - alpha(objective, t) * math.expm1(-h) * d_s


def singlestep_update(objective, network, x, times):
    """One singlestep DPM-Solver++ step over times [s, (s_1, (s_2,)) t], of order len(times) - 1: the network
    is evaluated at s and at the intermediate times, at lambda_s + r_i h."""
    s, t = times[0], times[-1]
    lambdas = [objective.marginal_lambda(u) for u in times]
    h = lambdas[-1] - lambdas[0]
    d_s = data_prediction(objective, network, x, s)
    x_t = first_order_part(objective, x, s, t, d_s)
    if len(times) == 2:
        return x_t
    r1 = (lambdas[1] - lambdas[0]) / h
    d_s1 = data_prediction(objective, network, first_order_part(objective, x, s, times[1], d_s), times[1])
    if len(times) == 3:
        return x_t - (0.5 / r1) * alpha(objective, t) * math.expm1(-h) * (d_s1 - d_s)
    r2 = (lambdas[2] - lambdas[0]) / h
    s2 = times[2]
    correction = (r2 / r1) * alpha(objective, s2) * phi_2(r2 * h) * (d_s1 - d_s)
    x_s2 = first_order_part(objective, x, s, s2, d_s) + correction
    d_s2 = data_prediction(objective, network, x_s2, s2)
    return x_t + (1 / r2) * alpha(objective, t) * phi_2(h) * (d_s2 - d_s)


def singlestep_orders(num_steps, order):
    """Orders of the steps that spend num_steps evaluations: all `order` but the last ones (DPM-Solver-fast)."""
    if order == 1:
        return [1] * num_steps
    if order == 2:
        return [2] * (num_steps // 2) + [1] * (num_steps % 2)
    tail = {0: [2, 1], 1: [1], 2: [2]}[num_steps % 3]
    return [3] * ((num_steps - sum(tail)) // 3) + tail


def time_grid(objective, num_steps, skip):
    """num_steps + 1 host-float times from T down to t_0 of the objective's sampling_range, uniform in t
    ('time_uniform') or in lambda ('logSNR')."""
    t_start, t_end = objective.sampling_range()
    if skip == "time_uniform":
        return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()
    lambdas = torch.linspace(objective.marginal_lambda(t_start), objective.marginal_lambda(t_end), num_steps + 1,
                             dtype=torch.float64).tolist()
    return [t_start] + [objective.inverse_lambda(lam) for lam in lambdas[1:-1]] + [t_end]


def singlestep(objective, network, x, times, order):
    """DPM-Solver-fast as U-ViT runs it: steps of `singlestep_orders`, step k spanning order_k intervals of the
    grid, its intermediate evaluations at the grid points inside it. On a time-uniform grid the fractions r_i of
    a step in lambda are not exactly 1/3 and 2/3 (1/2 for order 2) but differ from them by O(h), which keeps the
    order."""
    start = 0
    for step_order in singlestep_orders(len(times) - 1, order):
        x = singlestep_update(objective, network, x, times[start:start + step_order + 1])
        start += step_order
    return x


def multistep_update(objective, x, times, ds, t):
    """One DPM-Solver++ multistep step from times[-1] to t, of order len(ds): ds are the data predictions at the
    last len(ds) times. The derivatives of D in lambda come from divided differences of ds."""
    s = times[-1]
    x_t = first_order_part(objective, x, s, t, ds[-1])
    if len(ds) == 1:
        return x_t
    lambdas = [objective.marginal_lambda(u) for u in times[-len(ds):]]
    h = objective.marginal_lambda(t) - lambdas[-1]
    alpha_t = alpha(objective, t)
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (ds[-1] - ds[-2]) / r0  # ~ h D' half a step back
    if len(ds) == 2:
        return x_t - 0.5 * alpha_t * math.expm1(-h) * d1_0
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (ds[-2] - ds[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # ~ h D' at s
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D''
    phi_3 = phi_2(h) / h - 0.5
    return x_t + alpha_t * phi_2(h) * d1 - alpha_t * phi_3 * d2


def multistep(objective, network, x, times, order):
    """DPM-Solver++(2M / 3M): one evaluation per step; step i has order min(order, i + 1). The lower-order first
    steps leave 3M with a global error of second order in h, with a much smaller constant than 2M's."""
    ds = []
    for i, t in enumerate(times[1:]):
        ds = (ds + [data_prediction(objective, network, x, times[i])])[-order:]
        x = multistep_update(objective, x, times[:i + 1], ds, t)
    return x


@register_sampler("dpm-solver", families=("vp-eps",))
@torch.no_grad()
def dpm_solver(objective, network, noise, num_steps=50, generator=None, order=3, method="singlestep",
               skip="time_uniform"):
    """DPM-Solver++ from T to t_0 of the objective's `sampling_range` in num_steps network evaluations.

    order: 1, 2 or 3; method: 'singlestep' (U-ViT's sampling: DPM-Solver-fast) or 'multistep'; skip: the time
    grid, 'time_uniform' (U-ViT's) or 'logSNR'. Deterministic (`generator` is unused)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    if method not in METHODS:
        raise ValueError(f"unknown DPM-Solver method {method!r}, expected one of {METHODS}")
    if skip not in SKIPS:
        raise ValueError(f"unknown DPM-Solver time grid {skip!r}, expected one of {SKIPS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    solve = singlestep if method == "singlestep" else multistep
    return solve(objective, network, noise.float(), time_grid(objective, num_steps, skip), order)
