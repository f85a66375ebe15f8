"""The backbone interface: what train.py, the objectives and the samplers may use of a denoising network.

A backbone is an nn.Module with
- `architecture` (class attribute): its key in `models.ARCHITECTURES`, and `config`: the constructor kwargs, so
  that `ARCHITECTURES.get(architecture)(**config)` rebuilds it (checkpoints record both);
- `forward(x, t, y, **kwargs) -> (prediction, aux)`: x the noisy input (N, C, H, W), t what its objective's
  `network_time` gives, y the condition (caption tokens, class labels, or None); aux a dict of named auxiliary
  outputs (e.g. "repa": projector outputs for the REPA loss);
- `conditioning`: "text", "class" or "none", and `null_condition(batch_size, device)` for guidance and dropout;
- `latent_shape`: the (C, H, W) it denoises;
- training hooks with working defaults: `set_gradient_checkpointing`, `compile_regions`, and a per-backbone random
  state for training-time randomness (SiT's path drop) that checkpoints save and restore;
- `default_objective` and `objective_defaults`: the objective train.py builds unless --objective names another,
  and its constructor arguments (e.g. the fixed variance of a 'gaussian' objective).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class Backbone(nn.Module):
    """Base class with the default training hooks; subclasses define forward, config and the condition."""

    architecture: str = ""
    default_objective: str = "flow"
    objective_defaults: dict = {}  # config of the default objective (train.py's flags override it)
    sampling_defaults: dict = {}  # generate.py's defaults for this family (sampler, num_steps, cfg_scale, guidance_*)

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, config: dict):
        """Rebuild from the `config` a checkpoint recorded."""
        return cls(**config)

    @property
    def conditioning(self) -> str:
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple:
        size = self.config["input_size"]
        return (self.config["in_channels"], size, size)

    def null_condition(self, batch_size: int, device=None):
        raise NotImplementedError(f"{type(self).__name__} has no null condition")

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass (blocks run through `run_block`)."""
        self.gradient_checkpointing = enabled

    def run_block(self, block, *args):
        """block(*args), checkpointed when gradient checkpointing is on and gradients are being recorded."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def compile_regions(self) -> list:
        """Modules to torch.compile for training: the whole network, or its blocks one by one under gradient
        checkpointing (a whole-graph compile would undo its memory saving)."""
        if self.gradient_checkpointing and hasattr(self, "blocks"):
            return list(self.blocks)
        return [self]

    def take_unused_parameters(self) -> list:
        """Parameters that the training forwards since the last call did not use: their (zero) gradients are
        dropped before the optimizer step so that momentum does not move them. None by default."""
        return []

    def seed_training_rng(self, seed: int):
        """Seed the backbone's own training-time randomness (none by default)."""

    def training_rng_state(self) -> dict:
        """State of the backbone's own training-time randomness, for checkpoints."""
        return {}

    def load_training_rng_state(self, state: dict):
        """Restore what `training_rng_state` returned."""
