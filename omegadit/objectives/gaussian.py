"""Discrete Gaussian diffusion with noise prediction: DDPM (Ho et al. 2020) with the learned-range variance and
hybrid loss of improved DDPM / ADM (Nichol & Dhariwal 2021, arXiv:2102.09672; Dhariwal & Nichol 2021), as DiT
(Peebles & Xie 2023) trains it; with the scaled-linear schedule of Stable Diffusion (Rombach et al. 2022) and a
fixed variance it is also U-ViT's (Bao et al. 2023) noise-prediction objective.

Chain: x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps for timesteps i = 0..T-1, abar_i = prod_{j<=i} (1 - beta_j).
Time convention: timestep i is objective time t = (i + 1) / T, so t = 1 is the last (noisiest) timestep and t = 0
the clean data, as every objective here; the network takes the timestep i itself, as a float
(`network_time(t) = round(t T) - 1`, in training and sampling alike; a network trained on another timestep
convention, e.g. U-ViT's 1..T, overrides `network_time` only). Training draws i uniformly from {0, .., T-1}, as
DiT's train.py does.

Loss (ADM's hybrid loss with loss type MSE, as DiT uses it): terms 'mse', the mean squared error of the predicted
noise, and, with the learned-range variance, 'vb': the variational bound term in bits per dimension, KL(q(x_{i-1} |
x_i, x_0) || p(x_{i-1} | x_i)) for i > 0 and the discretised decoder NLL for i = 0, computed with the predicted mean
detached so that it trains the variance only. TrainingLoss adds them: loss = mse + vb, DiT's 'loss'. (ADM's
RESCALED_MSE would scale vb by T / 1000, which is 1 for DiT's T = 1000.)

Sampling uses respaced chains (ADM's timestep respacing, `respaced`): a subset of the timesteps whose betas are
rebuilt from the kept abar values, so that each kept step jumps straight from one kept timestep to the next.
"""
import math
from typing import Optional

import torch

from omegadit.objectives import OBJECTIVES
from omegadit.objectives.base import Objective, ObjectiveOutput, mean_flat

BETA_SCHEDULES = ("linear", "scaled_linear", "ldm_linear")
VARIANCES = ("learned_range", "fixed_small", "fixed_large")
SCALED_LINEAR_RANGE = (0.00085, 0.012)
LDM_LINEAR_RANGE = (0.0015, 0.0195)
DECODER_BIN = 1.0 / 255.0


def named_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """float64 betas (T,).

    'linear' (DDPM/ADM/DiT): evenly spaced from 1e-4 to 0.02, both scaled by 1000 / T.
    'scaled_linear' (Stable Diffusion, U-ViT): the square of evenly spaced values from sqrt(0.00085) to sqrt(0.012).
    'ldm_linear' (LDM's class-conditional ImageNet model, Rombach et al. 2022): the same form from sqrt(0.0015) to
    sqrt(0.0195).
    """
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name in ("scaled_linear", "ldm_linear"):
        low, high = SCALED_LINEAR_RANGE if name == "scaled_linear" else LDM_LINEAR_RANGE
        return torch.linspace(low ** 0.5, high ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta_schedule {name!r}, expected one of {BETA_SCHEDULES}")


def _stride_timesteps(num_timesteps: int, count: int) -> list:
    """'ddimN': every k-th timestep from 0, for the smallest stride k that gives exactly N of them."""
    for stride in range(1, num_timesteps + 1):
        kept = list(range(0, num_timesteps, stride))
        if len(kept) == count:
            return kept
    raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} timesteps; use even spacing")


def _section_timesteps(start: int, size: int, count: int) -> list:
    """`count` timesteps spread evenly over [start, start + size - 1], rounded, both ends included."""
    if count > size:
        raise ValueError(f"cannot keep {count} timesteps of a section of {size}")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    return [start + round(k * stride) for k in range(count)]


def space_timesteps(num_timesteps: int, spacing: str) -> list:
    """Sorted timesteps kept by ADM's respacing spec.

    'N' keeps N timesteps evenly over [0, T-1] (ends included); 'N1,N2,..' splits [0, T) into equal sections
    (the first T mod k one longer) and keeps N1, N2, .. evenly in each; 'ddimN' keeps 0, k, 2k, .. with the stride
    k that gives exactly N.
    """
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        return _stride_timesteps(num_timesteps, int(spacing[len("ddim"):]))
    counts = [int(part) for part in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for index, count in enumerate(counts):
        section = size + (1 if index < extra else 0)
        kept += _section_timesteps(start, section, count)
        start += section
    return sorted(set(kept))


def gather(values: torch.Tensor, index, like: torch.Tensor) -> torch.Tensor:
    """values[index] as float32 broadcastable against `like` (N, ...): per-sample for a tensor index (N,), a 0-dim
    tensor for an int index (a step of a sampler)."""
    if isinstance(index, int):
        return values[index].to(device=like.device, dtype=torch.float32)
    gathered = values.to(index.device)[index].float()
    return gathered.view(-1, *[1] * (like.ndim - 1))


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by DDPM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2) (DDPM, Ho et al. 2020,
    sec. 3.3): the mass of the bin of width 2/255 around x, with the edge bins open to -inf and +inf."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + DECODER_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - DECODER_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionChain:
    """A discrete chain: its betas (float64) and the quantities DDPM/DDIM need, per step k of the chain.

    `timesteps[k]` is the timestep of the full T-step chain that step k stands for (k itself unless respaced),
    `num_original` that T; `variance` the reverse-process variance type.
    """

    def __init__(self, betas: torch.Tensor, timesteps, num_original: int, variance: str):
        self.betas = betas.to(torch.float64)
        self.timesteps = list(timesteps)
        self.num_original = num_original
        self.variance = variance
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the first step; its log takes the second step's value there.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(self.betas)
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))

    def __len__(self) -> int:
        return len(self.betas)

    def time(self, k: int) -> float:
        """Objective time of step k: (original timestep + 1) / T."""
        return (self.timesteps[k] + 1) / self.num_original

    def q_sample(self, x0, k, noise):
        """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise."""
        return gather(self.sqrt_alphas_cumprod, k, x0) * x0 + gather(self.sqrt_one_minus_alphas_cumprod, k, x0) * noise

    def predict_x0(self, x, k, eps):
        """The clean data implied by noise prediction eps at x_k."""
        return gather(self.sqrt_recip_alphas_cumprod, k, x) * x - gather(self.sqrt_recipm1_alphas_cumprod, k, x) * eps

    def predict_eps(self, x, k, x0):
        """The noise that takes x0 to x_k (inverse of predict_x0)."""
        return (gather(self.sqrt_recip_alphas_cumprod, k, x) * x - x0) / gather(self.sqrt_recipm1_alphas_cumprod, k, x)

    def posterior_mean(self, x0, x, k):
        """Mean of q(x_{k-1} | x_k, x_0)."""
        return gather(self.posterior_mean_coef1, k, x) * x0 + gather(self.posterior_mean_coef2, k, x) * x

    def log_variance(self, k, x, variance_values=None):
        """Log variance of the reverse step p(x_{k-1} | x_k): learned range (network values v in [-1, 1]
        interpolate between log posterior variance, v = -1, and log beta_k, v = 1), fixed small (the posterior
        variance) or fixed large (beta_k)."""
        if self.variance == "learned_range":
            fraction = (variance_values + 1.0) / 2.0
            low = gather(self.posterior_log_variance_clipped, k, x)
            return fraction * gather(self.log_betas, k, x) + (1.0 - fraction) * low
        table = self.posterior_log_variance_clipped if self.variance == "fixed_small" else self.fixed_large_log_variance
        return gather(table, k, x).expand_as(x)

    def vb_bits(self, x0, x, k, eps, variance_values):
        """Per-sample variational bound term in bits per dimension: KL of the posterior to the reverse step for
        k > 0, the discretised decoder NLL of x0 for k == 0. k: (N,) steps."""
        model_mean = self.posterior_mean(self.predict_x0(x, k, eps), x, k)
        model_log_variance = self.log_variance(k, x, variance_values)
        true_mean = self.posterior_mean(x0, x, k)
        true_log_variance = gather(self.posterior_log_variance_clipped, k, x)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        return torch.where(k == 0, mean_flat(nll) / math.log(2.0), kl)

    def respaced(self, spacing: str) -> "DiffusionChain":
        """The chain over the timesteps `space_timesteps(len(self), spacing)` keeps, betas rebuilt as
        1 - abar_k / abar_{previous kept}."""
        kept = space_timesteps(len(self), spacing)
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return DiffusionChain(betas, [self.timesteps[k] for k in kept], self.num_original, self.variance)


@OBJECTIVES.register("gaussian")
class GaussianDiffusion(Objective):
    """Noise-prediction training on a discrete Gaussian chain of `num_timesteps` steps.

    variance: 'learned_range' (DiT: the network outputs 2C channels, noise then variance values; terms 'mse' and
    'vb'), 'fixed_small' or 'fixed_large' (C channels; term 'mse').
    clip_denoised: samplers clip the predicted data to [-1, 1] (`denoised`), as ADM and DDPM do for pixels; off
    for latents, which are unbounded (train.py turns it on for unnormalised pixel data).
    """

    name = "gaussian"
    family = "gaussian"
    default_sampler = "ddpm"

    def __init__(self, num_timesteps=1000, beta_schedule="linear", variance="learned_range", clip_denoised=False):
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}, expected one of {VARIANCES}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        super().__init__(num_timesteps=num_timesteps, beta_schedule=beta_schedule, variance=variance,
                         clip_denoised=clip_denoised)
        self.num_timesteps = num_timesteps
        self.clip_denoised = clip_denoised
        self.learned_variance = variance == "learned_range"
        self.chain = DiffusionChain(named_betas(beta_schedule, num_timesteps),
                                    range(num_timesteps), num_timesteps, variance)

    @property
    def term_names(self):
        return ("mse", "vb") if self.learned_variance else ("mse",)

    def network_time(self, t):
        """The timestep index (float) of objective times t = (i + 1) / T; rounded to the grid."""
        return torch.round(t.float() * self.num_timesteps) - 1.0

    def split_output(self, output: torch.Tensor, channels: int):
        """(noise prediction, variance values or None) of a network output for `channels` data channels."""
        expected = 2 * channels if self.learned_variance else channels
        if output.shape[1] != expected:
            raise ValueError(f"the {self.config['variance']} variance needs {expected} output channels for "
                             f"{channels} data channels, the network gave {output.shape[1]}")
        if self.learned_variance:
            return output[:, :channels], output[:, channels:]
        return output, None

    def denoised(self, chain: DiffusionChain, x, k, eps):
        """The data predicted from noise prediction eps at step k of `chain`, clipped to [-1, 1] with
        clip_denoised."""
        x0 = chain.predict_x0(x, k, eps)
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None):
        """Training timesteps (N,) long, uniform over {0, .., T-1}."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def __call__(self, model, x0, model_kwargs=None, generator=None, timesteps=None, noise=None) -> ObjectiveOutput:
        """One training pass on data x0 (N, C, H, W); timesteps (N,) and noise are drawn (with `generator`) unless
        given. Terms (N,) float32: 'mse' and, with the learned variance, 'vb'."""
        model_kwargs = model_kwargs or {}
        if timesteps is None:
            timesteps = self.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
        timesteps = timesteps.to(device=x0.device, dtype=torch.long)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        time = (timesteps + 1).float() / self.num_timesteps
        x_t = self.chain.q_sample(x0, timesteps, noise)
        output, aux = model(x_t, self.network_time(time), **model_kwargs)
        eps, variance_values = self.split_output(output.float(), x0.shape[1])
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learned_variance:
            terms["vb"] = self.chain.vb_bits(x0, x_t, timesteps, eps.detach(), variance_values)
        return ObjectiveOutput(terms, eps, noise, time.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1)), aux)

    def respaced(self, spacing) -> DiffusionChain:
        """The chain a sampler walks for an ADM respacing spec ('250', 'ddim50', '10,20'; see space_timesteps).
        Its steps' `time(k)` map through `network_time` back to the original timesteps."""
        return self.chain.respaced(spacing)
