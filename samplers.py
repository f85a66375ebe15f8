"""Sampling front end: the sampler registry (omegadit/sampling/) and, for flow models called directly, the
original's functions `euler_maruyama_sampler`, `euler_sampler` and `heun_sampler`.

Time runs from t = 1 (noise) to t = 0 (data). The direct functions take a model with the SiT signature
`model(x, t, y, uncond=False) -> (velocity, aux)` and build the flow objective and the guided network themselves.
"""
from omegadit.objectives.flow import DEFAULT_SHIFT_BASE, FlowMatching
from omegadit.sampling import SAMPLERS, check_sampler, sample
from omegadit.sampling.flow import gaussian_noise
from omegadit.sampling.guidance import GuidedNetwork

__all__ = ["SAMPLERS", "FLOW_SAMPLERS", "sample", "check_sampler", "time_grid", "gaussian_noise",
           "euler_maruyama_sampler", "euler_sampler", "heun_sampler", "GuidedNetwork"]


def time_grid(num_steps: int, stochastic: bool, time_shifting: bool = False, shift_dim: int = 1,
              shift_base: int = DEFAULT_SHIFT_BASE) -> list:
    """num_steps + 1 decreasing times from 1 to 0 of the flow samplers (see FlowMatching.sampling_times)."""
    return FlowMatching(time_shifting=time_shifting, shift_base=shift_base).sampling_times(num_steps, stochastic,
                                                                                          shift_dim)


def _flow_sampler(name):
    def run(model, latents, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
            path_type="linear", y_null=None, path_drop=False, time_shifting=False, shift_base=DEFAULT_SHIFT_BASE,
            generator=None):
        objective = FlowMatching(path_type=path_type, time_shifting=time_shifting, shift_base=shift_base)
        network = GuidedNetwork(model, objective, y, y_null, cfg_scale, (guidance_low, guidance_high), path_drop)
        return sample(name, objective, network, latents, num_steps, generator=generator)
    run.__name__ = f"{name}_sampler"
    run.__doc__ = (f"The '{name}' flow sampler on `model` with guidance scale cfg_scale inside [guidance_low, "
                   f"guidance_high]: {SAMPLERS.get(name).__doc__}")
    return run


euler_maruyama_sampler = _flow_sampler("sde")
euler_sampler = _flow_sampler("euler")
heun_sampler = _flow_sampler("heun")
FLOW_SAMPLERS = {"sde": euler_maruyama_sampler, "euler": euler_sampler, "heun": heun_sampler}
