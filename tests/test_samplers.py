"""Samplers on Gaussian data, whose exact velocity field is known in closed form, plus guidance bookkeeping."""
import math

import pytest
import torch

from samplers import FLOW_SAMPLERS as SAMPLERS, euler_maruyama_sampler, euler_sampler, heun_sampler, time_grid

NUM_SAMPLES = 8192


def path_coefficients(t, path_type):
    """(alpha, sigma, alpha', sigma') written out here, independently of loss.py."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    c, s = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
    return c, s, -math.pi / 2 * s, math.pi / 2 * c


class GaussianVelocity:
    """Exact velocity v(x, t) = E[alpha' x0 + sigma' eps | x_t] for data x0 ~ N(mean[y], diag(std[y]^2)).

    Class y selects the Gaussian (y is also the null class of the guidance tests). Records every call as
    (batch size, times, uncond argument or None when not passed).
    """

    def __init__(self, means, stds, path_type="linear", out_dtype=None):
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)
        self.path_type = path_type
        self.out_dtype = out_dtype
        self.calls = []

    def velocity(self, x, t, y):
        x = x.double()
        m = self.means[y].view(x.shape[0], -1, *[1] * (x.dim() - 2))
        s = self.stds[y].view(x.shape[0], -1, *[1] * (x.dim() - 2))
        alpha, sigma, d_alpha, d_sigma = path_coefficients(t.double().view(-1, *[1] * (x.dim() - 1)), self.path_type)
        deviation = (x - alpha * m) / (alpha ** 2 * s ** 2 + sigma ** 2)
        x0_mean = m + alpha * s ** 2 * deviation
        eps_mean = sigma * deviation
        return d_alpha * x0_mean + d_sigma * eps_mean

    def __call__(self, x, t, y, **kwargs):
        self.calls.append((x.shape[0], t.clone(), kwargs.get("uncond")))
        assert set(kwargs) <= {"uncond"}
        v = self.velocity(x, t, y)
        return v.to(self.out_dtype or x.dtype), []


class GuidedGaussian(GaussianVelocity):
    """The guided field v_u + w (v_c - v_u) as a plain model (class 0 conditional, class 1 null)."""

    def __init__(self, means, stds, scale, path_type="linear"):
        super().__init__(means, stds, path_type)
        self.scale = scale

    def velocity(self, x, t, y):
        v_cond = super().velocity(x, t, torch.zeros_like(y))
        v_uncond = super().velocity(x, t, torch.ones_like(y))
        return v_uncond + self.scale * (v_cond - v_uncond)


MEAN, STD = [1.0, -0.5], [0.5, 1.5]


def gaussian_setup(n=NUM_SAMPLES, seed=0, path_type="linear"):
    model = GaussianVelocity([MEAN, [-1.0, 2.0]], [STD, [1.0, 0.3]], path_type)
    noise = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))
    labels = torch.zeros(n, dtype=torch.long)
    return model, noise, labels


def moments(x):
    x = x.flatten(1).double()
    return x.mean(0), torch.cov(x.T)


def moment_error(x, mean, cov):
    m, c = moments(x)
    return max((m - mean).abs().max().item(), (c - cov).abs().max().item())


def test_time_grids():
    assert time_grid(5, stochastic=False) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert time_grid(4, stochastic=True) == pytest.approx([1.0, 0.68, 0.36, 0.04, 0.0])
    t = time_grid(6, stochastic=True, time_shifting=True, shift_dim=16384)
    base = torch.linspace(1, 0.04, 6, dtype=torch.float64)
    assert t == pytest.approx((2 * base / (1 + base)).tolist() + [0.0])
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0, stochastic=False)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_samplers_converge_to_exact_transport(path_type):
    """The probability-flow map of N(0, I) -> N(m, diag(s^2)) is z -> m + s z: compare moments with that exact
    pushforward of the same noise (discretisation error only), then with the data distribution itself."""
    model, noise, labels = gaussian_setup(path_type=path_type)
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    exact_mean, exact_cov = moments(mean.view(1, 2, 1, 1) + std.view(1, 2, 1, 1) * noise.double())
    errors = {}
    for name, sampler in (("euler", euler_sampler), ("heun", heun_sampler)):
        for steps in (8, 16, 32, 64):
            x = sampler(model, noise, labels, num_steps=steps, path_type=path_type)
            assert x.dtype == torch.float32 and x.shape == noise.shape
            errors[name, steps] = moment_error(x, exact_mean, exact_cov)
    for steps in (8, 16, 32, 64):
        assert errors["euler", steps] < 8.0 / steps, errors  # first order
        assert errors["heun", steps] < 4.0 / steps ** 2, errors  # second order
        assert errors["heun", steps] < errors["euler", steps], errors
    for steps in (8, 16, 32):
        assert 1.6 < errors["euler", steps] / errors["euler", 2 * steps] < 2.5, errors
        assert 3.0 < errors["heun", steps] / errors["heun", 2 * steps] < 5.0, errors
    # Against the data distribution: sampling error of 8192 samples (mean 4 s/sqrt(N), cov 4 s^2 sqrt(2/N)).
    x = heun_sampler(model, noise, labels, num_steps=64, path_type=path_type)
    m, c = moments(x)
    assert (m - mean).abs().max().item() < 4 * 1.5 / math.sqrt(NUM_SAMPLES)
    assert (c - torch.diag(std ** 2)).abs().max().item() < 4 * 2.25 * math.sqrt(2 / NUM_SAMPLES)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_sampler_reproduces_data_moments(path_type):
    """Stochastic, so compare with the data distribution: error below 5/num_steps + 0.04 (about 3 standard errors
    of the covariance from 65536 samples, plus the ~0.005 bias of stopping the noise at t = 0.04)."""
    model, noise, labels = gaussian_setup(n=8 * NUM_SAMPLES, path_type=path_type)
    mean, cov = torch.tensor(MEAN, dtype=torch.float64), torch.diag(torch.tensor(STD, dtype=torch.float64) ** 2)
    errors = []
    for steps in (8, 32, 128):
        x = euler_maruyama_sampler(model, noise, labels, num_steps=steps, path_type=path_type,
                                   generator=torch.Generator().manual_seed(1))
        assert x.dtype == torch.float32
        errors.append(moment_error(x, mean, cov))
        assert errors[-1] < 5.0 / steps + 0.04, (steps, errors)
    assert errors[0] > errors[-1]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_equals_guided_field(name):
    """CFG with scale w on the (conditional, null) pair equals sampling the field v_u + w (v_c - v_u) directly."""
    sampler = SAMPLERS[name]
    model, noise, labels = gaussian_setup(n=512)
    y_null = torch.ones_like(labels)
    guided = sampler(model, noise, labels, num_steps=12, cfg_scale=3.0, y_null=y_null,
                     generator=torch.Generator().manual_seed(2))
    # One batched call of 2N per evaluation, never two calls.
    assert len(model.calls) == (23 if name == "heun" else 12)
    assert all(size == 2 * 512 for size, _, _ in model.calls)
    reference = sampler(GuidedGaussian(model.means.tolist(), model.stds.tolist(), 3.0), noise, labels, num_steps=12,
                        generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(guided, reference, atol=1e-5, rtol=1e-5)
    unguided = sampler(model, noise, labels, num_steps=12, generator=torch.Generator().manual_seed(2))
    assert (guided - unguided).abs().max().item() > 0.1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_scale_one_is_no_guidance(name):
    sampler = SAMPLERS[name]
    model, noise, labels = gaussian_setup(n=256)
    plain = sampler(model, noise, labels, num_steps=6, generator=torch.Generator().manual_seed(3))
    calls = len(model.calls)
    model.calls.clear()
    scale_one = sampler(model, noise, labels, num_steps=6, cfg_scale=1.0, y_null=torch.ones_like(labels),
                        path_drop=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, scale_one)
    assert len(model.calls) == calls
    assert all(size == 256 and uncond is None for size, _, uncond in model.calls)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_only_inside_interval(name):
    model, noise, labels = gaussian_setup(n=64)
    SAMPLERS[name](model, noise, labels, num_steps=10, cfg_scale=4.0, guidance_low=0.3, guidance_high=0.7,
                   y_null=torch.ones_like(labels))
    inside = outside = 0
    for size, t, _ in model.calls:
        assert (t == t[0]).all()
        expected = 128 if 0.3 <= t[0].item() <= 0.7 else 64
        assert size == expected, (t[0].item(), size)
        inside += size == 128
        outside += size == 64
    assert inside > 0 and outside > 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_path_drop_flags_only_unconditional_half(name):
    model, noise, labels = gaussian_setup(n=16)
    SAMPLERS[name](model, noise, labels, num_steps=5, cfg_scale=2.0, guidance_high=0.5, y_null=torch.ones_like(labels),
                   path_drop=True)
    seen_guided = seen_plain = False
    for size, t, uncond in model.calls:
        if size == 32:
            assert uncond == 16  # the unconditional half starts at sample 16
            seen_guided = True
        else:
            assert uncond is None
            seen_plain = True
    assert seen_guided and seen_plain
    model.calls.clear()
    SAMPLERS[name](model, noise, labels, num_steps=5, cfg_scale=2.0, y_null=torch.ones_like(labels))
    assert all(size == 32 and uncond is None for size, _, uncond in model.calls)


def test_null_condition_from_model_and_missing_null():
    model, noise, labels = gaussian_setup(n=8)
    with pytest.raises(ValueError, match="y_null"):
        euler_sampler(model, noise, labels, num_steps=3, cfg_scale=2.0)
    model.null_condition = lambda batch_size, device=None: torch.ones(batch_size, dtype=torch.long, device=device)
    from_model = euler_sampler(model, noise, labels, num_steps=3, cfg_scale=2.0)
    given = euler_sampler(model, noise, labels, num_steps=3, cfg_scale=2.0, y_null=torch.ones(1, dtype=torch.long))
    torch.testing.assert_close(from_model, given)


def test_text_conditioning_shapes():
    """Caption embeddings (N, L, D) as y and y_null work the same way as class labels."""
    calls = []

    def model(x, t, y, uncond=False):
        calls.append(y.shape)
        return -x + y.mean(dim=(1, 2)).view(-1, 1, 1, 1), []

    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y, y_null = torch.ones(3, 77, 8), torch.zeros(3, 77, 8)
    out = heun_sampler(model, x, y, num_steps=4, cfg_scale=2.0, y_null=y_null)
    assert out.shape == x.shape and calls[0] == (6, 77, 8)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seed_reproducibility(name):
    model, noise, labels = gaussian_setup(n=128)
    sampler = SAMPLERS[name]
    first = sampler(model, noise, labels, num_steps=8, generator=torch.Generator().manual_seed(7))
    second = sampler(model, noise, labels, num_steps=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    torch.manual_seed(11)
    global_first = sampler(model, noise, labels, num_steps=8)
    torch.manual_seed(11)
    global_second = sampler(model, noise, labels, num_steps=8)
    assert torch.equal(global_first, global_second)
    other = sampler(model, noise, labels, num_steps=8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, other) == (name != "sde")


def test_per_sample_generators_independent_of_batching():
    def gens(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    model, noise, labels = gaussian_setup(n=3)
    batched = euler_maruyama_sampler(model, noise, labels, num_steps=6, generator=gens([4, 5, 6]))
    alone = euler_maruyama_sampler(model, noise[1:2], labels[1:2], num_steps=6, generator=gens([5]))
    torch.testing.assert_close(batched[1:2], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(batched[0], batched[1])
    with pytest.raises(ValueError, match="generators"):
        euler_maruyama_sampler(model, noise, labels, num_steps=3, generator=gens([1, 2]))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("time_shifting", [False, True])
def test_time_shifting_grid(name, time_shifting):
    """Latents (N, 4, 8, 8): shift_dim 256, s = sqrt(256 / 4096) = 1/4, t -> s t / (1 + (s - 1) t)."""
    model = GaussianVelocity([[0.0] * 4], [[1.0] * 4])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    SAMPLERS[name](model, x, torch.zeros(2, dtype=torch.long), num_steps=6, time_shifting=time_shifting)
    grid = torch.linspace(1, 0.04, 6, dtype=torch.float64) if name == "sde" else torch.linspace(1, 0, 7,
                                                                                              dtype=torch.float64)
    if time_shifting:
        grid = 0.25 * grid / (1 - 0.75 * grid)
    if name == "sde":
        expected = grid
    elif name == "euler":
        expected = grid[:-1]
    else:
        expected = torch.cat([torch.stack([grid[:-2], grid[1:-1]], dim=1).flatten(), grid[-2:-1]])
    called = torch.stack([t[0] for _, t, _ in model.calls]).double()
    torch.testing.assert_close(called, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_state_is_float32_whatever_the_model_precision(name):
    model, noise, labels = gaussian_setup(n=64)
    reference = SAMPLERS[name](model, noise, labels, num_steps=6, generator=torch.Generator().manual_seed(0))
    low = GaussianVelocity(model.means.tolist(), model.stds.tolist(), out_dtype=torch.bfloat16)
    out = SAMPLERS[name](low, noise.bfloat16(), labels, num_steps=6, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert all(t.dtype == torch.float32 for _, t, _ in low.calls)
    assert (out - reference).abs().max().item() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host-device syncs")
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_no_host_device_sync_cuda(name):
    def model(x, t, y, uncond=False):
        return -x * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1), []

    x = torch.randn(4, 4, 8, 8, device="cuda")
    y = torch.ones(4, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = SAMPLERS[name](model, x, y, num_steps=5, cfg_scale=2.0, guidance_high=0.7, y_null=torch.zeros_like(y),
                             path_drop=True, time_shifting=True, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and torch.isfinite(out).all().item()
