"""The backbone interface: what train.py, the objectives and the samplers may use of a denoising network.

A backbone is an nn.Module with
- `architecture` (class attribute): its key in `models.ARCHITECTURES`, and `config`: the constructor kwargs, so
  that `ARCHITECTURES.get(architecture)(**config)` rebuilds it (checkpoints record both);
- `forward(x, t, y, **kwargs) -> (prediction, aux)`: x the noisy input (N, C, H, W), t what its objective's
  `network_time` gives, y the condition (caption tokens, class labels, or None); aux a dict of named auxiliary
  outputs (e.g. "repa": projector outputs for the REPA loss);
- `conditioning`: "text", "class" or "none", and `null_condition(batch_size, device)` for guidance and dropout;
- `latent_shape`: the (C, H, W) it denoises;
- training hooks with working defaults: `set_gradient_checkpointing`, `compile_regions`, `shard_units` (what
  FSDP shards one by one), and a per-backbone random
  state for training-time randomness (SiT's path drop) that checkpoints save and restore;
- `default_objective` and `objective_defaults`: the objective train.py builds unless --objective names another,
  and its constructor arguments (e.g. the fixed variance of a 'gaussian' objective).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def register_sizes(registry, family: str, cls, sizes: dict, patch_sizes) -> dict:
    """Register '<family>-<size>/<patch>' constructors of `cls` for every size (constructor kwargs) and patch size
    in `registry`; returns {name: constructor}. A constructor's signature is that of `cls` (inspect follows
    __wrapped__), so train.py can tell which options it takes."""
    constructors = {}
    for size, dims in sizes.items():
        for patch in patch_sizes:
            def build(_dims=dims, _patch=patch, **kwargs):
                return cls(patch_size=_patch, **_dims, **kwargs)
            build.__name__ = f"{cls.__name__}_{size}_{patch}"
            build.__doc__ = f"{family}-{size}/{patch}: {dims}, patch size {patch}."
            build.__wrapped__ = cls
            constructors[f"{family}-{size}/{patch}"] = registry.register(f"{family}-{size}/{patch}", build)
    return constructors


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, g*g tokens, p*p*C) -> (N, C, g*p, g*p), the inverse of a row-major patch embedding."""
    grid = int(round(x.shape[1] ** 0.5))
    x = x.reshape(x.shape[0], grid, grid, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid * patch_size, grid * patch_size)


def init_adaln_zero(model: nn.Module):
    """DiT's initialisation (Peebles & Xie 2023): Xavier-uniform linears and patch projection, N(0, 0.02) time MLP
    and class table, zeroed adaLN modulation and output layer, for models with x_embedder.proj, t_embedder.mlp,
    blocks[*].adaLN_modulation and final_layer (adaLN_modulation, linear); a y_embedder.embedding_table if any."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    weight = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    if hasattr(model.y_embedder, "embedding_table"):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


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

    def compile_regions(self, regional: bool = True) -> list:
        """Modules to torch.compile: the blocks one by one (regional compilation, omegadit/compilation.py: blocks
        of one class share one compiled graph, the layers between them run eagerly), or, with `regional` False,
        the whole network, except under gradient checkpointing (a whole-graph compile would undo its memory
        saving)."""
        if hasattr(self, "blocks") and (regional or self.gradient_checkpointing):
            return list(self.blocks)
        return [self]

    def shard_units(self) -> list:
        """Submodules that FSDP (train.py --fsdp) shards one by one, so that only one of them is gathered at a time:
        the transformer blocks by default; the rest of the network forms one more unit."""
        return list(getattr(self, "blocks", []))

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


class ClassLabelTransformer(Backbone):
    """A DiT-style transformer conditioned on class labels (DiT, LightningDiT): a LabelEmbedder `y_embedder` whose
    extra row num_classes is the null class, and DiT's adaLN-Zero initialisation."""

    @property
    def conditioning(self):
        return "class"

    def null_condition(self, batch_size, device=None):
        """The null class index num_classes, (N,) long, used for guidance and label dropout."""
        return self.y_embedder.null(batch_size, device)

    def initialize_weights(self):
        init_adaln_zero(self)
