"""Samplers for discrete Gaussian diffusion (omegadit/objectives/gaussian.py): ancestral DDPM sampling (Ho et al.
2020) and DDIM (Song et al. 2021, arXiv:2010.02502), on a respaced chain as in ADM (Nichol & Dhariwal 2021) and
DiT (Peebles & Xie 2023). The predicted data are clipped to [-1, 1] where the objective says so (its
`clip_denoised`, on for pixels as in ADM and DDPM; latents are unbounded).

The network is a `GuidedNetwork` called with objective times: step k of the respaced chain is at
`chain.time(k) = (original timestep + 1) / T`, which the objective's `network_time` maps back to the original
timestep the network was trained on. Its output holds the noise prediction (and, with the learned variance, the
variance values); DiT guides the first 3 channels only (`GuidedNetwork(..., channels=3)`).
"""
import torch

from omegadit.objectives.gaussian import gather
from omegadit.sampling import register_sampler
from omegadit.sampling.flow import Generators, gaussian_noise

SPACINGS = ("even", "stride")


def respaced_chain(objective, num_steps: int, spacing: str):
    """The objective's chain over `num_steps` timesteps: 'even' (ADM spec 'N': evenly over [0, T-1], ends
    included; DiT's DDPM sampling) or 'stride' (ADM spec 'ddimN': 0, k, 2k, ..)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}, expected one of {SPACINGS}")
    return objective.respaced(str(num_steps) if spacing == "even" else f"ddim{num_steps}")


def _predict(objective, chain, network, x, k):
    """(noise prediction, variance values or None) of the network at step k."""
    return objective.split_output(network(x, chain.time(k)), x.shape[1])


@register_sampler("ddpm", families=("gaussian",))
@torch.no_grad()
def ddpm(objective, network, noise, num_steps=250, generator: Generators = None, spacing="even"):
    """Ancestral sampling: x_{k-1} ~ N(posterior mean of the predicted x0, reverse-step variance), no noise on the
    last step. num_steps network evaluations; DiT samples with 250 evenly spaced steps."""
    chain = respaced_chain(objective, num_steps, spacing)
    x = noise.float()
    for k in reversed(range(len(chain))):
        eps, variance_values = _predict(objective, chain, network, x, k)
        mean = chain.posterior_mean(objective.denoised(chain, x, k, eps), x, k)
        if k > 0:
            mean = mean + torch.exp(0.5 * chain.log_variance(k, x, variance_values)) * gaussian_noise(x, generator)
        x = mean
    return x


@register_sampler("ddim", families=("gaussian",))
@torch.no_grad()
def ddim(objective, network, noise, num_steps=50, generator: Generators = None, spacing="stride", eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_{k-1} = sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1} - s^2) eps + s z with
    s = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1}); eta = 0 is deterministic.
    num_steps network evaluations; the default 'stride' spacing is ADM's 'ddimN'. The update uses the noise
    implied by x_k and the predicted x0 (equal to the prediction up to rounding, unless clipped) in float32, as
    ADM computes it."""
    chain = respaced_chain(objective, num_steps, spacing)
    x = noise.float()
    for k in reversed(range(len(chain))):
        eps, _ = _predict(objective, chain, network, x, k)
        x0 = objective.denoised(chain, x, k, eps)
        eps = chain.predict_eps(x, k, x0)
        abar, abar_prev = gather(chain.alphas_cumprod, k, x), gather(chain.alphas_cumprod_prev, k, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = x0 * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0 and k > 0:
            x = x + sigma * gaussian_noise(x, generator)
    return x
