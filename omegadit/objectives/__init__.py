"""Training objectives and auxiliary losses, by name.

OBJECTIVES: 'flow' (flow matching, velocity prediction: SiT/OmegaDiT) and the peers' objectives registered by
their modules. AUX_LOSSES: 'repa' (projection loss), 'cfm' (contrastive flow matching).
"""
from omegadit.registry import Registry

OBJECTIVES = Registry("objective")
AUX_LOSSES = Registry("auxiliary loss")


def build_objective(name: str, **config):
    """The objective registered as `name`, built with its config (what a checkpoint records)."""
    return OBJECTIVES.build(name, **config)


from omegadit.objectives import auxiliary, flow, gaussian, lightningdit, uvit  # noqa: E402,F401  (register)
