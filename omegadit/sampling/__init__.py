"""Samplers by name. Each runs on an objective (its time grid and output conversions) and a `GuidedNetwork`
(the network with classifier-free guidance), from noise at t = 1 to data at t = 0.

A sampler is registered with the objective family it applies to: 'flow' samplers (sde, euler, heun) use the
velocity, 'gaussian' samplers (ddpm, ddim) the discrete noise schedule; `sample` checks the pairing.
"""
from omegadit.registry import Registry

SAMPLERS = Registry("sampler")


def register_sampler(name: str, families):
    """Decorator: register a sampler function for the objective families it supports."""
    def add(fn):
        fn.families = tuple(families)
        return SAMPLERS.register(name, fn)
    return add


def check_sampler(name: str, objective):
    """The sampler registered as `name`, after checking that it works with `objective`."""
    sampler = SAMPLERS.get(name)
    if objective.family not in sampler.families:
        usable = [n for n in SAMPLERS.names() if objective.family in SAMPLERS.get(n).families]
        raise ValueError(f"sampler {name!r} does not apply to the {objective.name!r} objective; use one of {usable}")
    return sampler


def sample(name: str, objective, network, noise, num_steps: int, generator=None, **options):
    """Run sampler `name` from `noise`; returns float32 samples at t = 0."""
    return check_sampler(name, objective)(objective, network, noise, num_steps, generator=generator, **options)


from omegadit.sampling import dpm_solver, flow, gaussian  # noqa: E402,F401  (register)
