"""Denoising networks and the frozen networks around them.

BACKBONES maps model names ('SiT-B/1', ...) to constructors; ARCHITECTURES maps each network class's
`architecture` to the class, so that a checkpoint rebuilds a network from (architecture, config).
Importing this package registers every backbone module listed below.
"""
from omegadit.registry import Registry

BACKBONES = Registry("model")
ARCHITECTURES = Registry("architecture")


def build_backbone(name: str, **kwargs):
    """The network registered as `name` (e.g. 'SiT-B/1'), built with kwargs (input size, channels, condition)."""
    return BACKBONES.build(name, **kwargs)


def rebuild_backbone(architecture: str, config: dict):
    """A network from the (architecture, config) a checkpoint recorded."""
    return ARCHITECTURES.get(architecture).from_config(config)


from models import dit, lightningdit, sit, unet, uvit  # noqa: E402,F401  (register the backbone families)
