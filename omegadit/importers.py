"""Checkpoints released by other projects, recognised by their key layout and described as our own.

Each importer turns a state dict in its project's layout into (description, state dict in our layout); the
description names the backbone, the project's objective, a class conditioner, its autoencoder, latent statistics
where they are fixed, and its sampling defaults (see omegadit/checkpoint.py).
"""
import torch

from omegadit.registry import Registry
from omegadit.weights_io import strip_wrapper_prefixes

IMPORTERS = Registry("checkpoint format")
SD_VAE = "stabilityai/sd-vae-ft-ema"
VAVAE = "vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml"


def _class_conditioner(config):
    return {"name": "class", "config": {"num_classes": config["num_classes"]}}


def _description(name, architecture, config, objective, conditioner, autoencoder, sampling, latent_stats=None):
    description = {"format": 1, "backbone": {"name": name, "architecture": architecture, "config": config},
                   "objective": {"name": objective, "config": {}}, "conditioner": conditioner,
                   "autoencoder": autoencoder, "sampling": sampling}
    if latent_stats is not None:
        mean, std = latent_stats
        description["latent_stats"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return description


@IMPORTERS.register("dit")
def import_dit(state_dict, args):
    """facebookresearch/DiT: released DiT-XL-2-*.pt and its train.py checkpoints; SD-VAE latents x 0.18215."""
    from models.dit import DiT, convert_dit_state_dict, dit_latent_stats, dit_model_name, infer_dit_config

    config = infer_dit_config(state_dict)
    description = _description(dit_model_name(config) or "DiT", "dit", config, "gaussian", _class_conditioner(config),
                               SD_VAE, dict(DiT.sampling_defaults), dit_latent_stats(config["in_channels"]))
    return description, convert_dit_state_dict(state_dict, config)


@IMPORTERS.register("lightningdit")
def import_lightningdit(state_dict, args):
    """hustvl/LightningDiT: its VA-VAE ImageNet models; latent statistics come from its latents_stats.pt
    (generate.py --latent-stats)."""
    from models.lightningdit import LightningDiT, from_lightningdit

    _, config, converted = from_lightningdit(state_dict)
    description = _description("LightningDiT", "lightningdit", config, "lightningdit-flow",
                               _class_conditioner(config), VAVAE, dict(LightningDiT.sampling_defaults))
    return description, converted


@IMPORTERS.register("uvit")
def import_uvit(state_dict, args):
    """baofff/U-ViT: ImageNet (class) and MS-COCO (77 CLIP-L tokens, last hidden state) nnet.pth files; SD-VAE
    latents x 0.18215. The MS-COCO null context (the empty caption's features) is not in those files: it starts at
    zero here (see models/uvit.py set_null_context)."""
    from models.dit import dit_latent_stats
    from models.uvit import UViT, convert_uvit_state_dict, uvit_config_from_state_dict

    converted = convert_uvit_state_dict(state_dict)
    config = uvit_config_from_state_dict(converted)
    sampling = dict(UViT.sampling_defaults)
    if config["text_dim"] is not None:
        converted.setdefault("null_context", torch.zeros(config["text_len"], config["text_dim"]))
        conditioner = {"name": "text", "config": {"text_encoder": "openai/clip-vit-large-patch14",
                                                  "text_len": config["text_len"], "clip_output": "last"}}
        sampling["cfg_scale"] = 2.0  # its MS-COCO scale s = 1
    else:
        conditioner = _class_conditioner(config)
    description = _description("U-ViT", "uvit", config, "uvit-eps", conditioner, SD_VAE, sampling,
                               dit_latent_stats(config["in_channels"]))
    return description, converted


@IMPORTERS.register("omegadit-original")
def import_original_omegadit(state_dict, args):
    """The original OmegaDiT train.py ({'model', 'ema', 'args'}): a text-conditioned SiT."""
    from models.sit import from_reference, reference_kwargs_from_args
    from omegadit.checkpoint import sit_description

    model = from_reference(state_dict, **reference_kwargs_from_args(_Args(args), state_dict))
    return sit_description(model.config, args), model.state_dict()


class _Args:
    """Attribute access to a saved args dict, as reference_kwargs_from_args expects of a Namespace."""

    def __init__(self, values):
        if not values or "model" not in values:
            raise ValueError("the checkpoint carries no training args naming the model")
        self.__dict__.update(values)


def detect_format(state_dict) -> str:
    """The project whose key layout `state_dict` has."""
    keys = set(strip_wrapper_prefixes(state_dict, ("module.", "_orig_mod.", "model.")))
    if "fusion_proj.weight" in keys and "y_embedder.y_embedding" in keys:
        return "omegadit-original"
    if "feat_rope.freqs_cos" in keys and "blocks.0.mlp.w3.weight" in keys:
        return "lightningdit"
    if "blocks.0.mlp.fc1.weight" in keys and "y_embedder.embedding_table.weight" in keys:
        return "dit"
    if any(k.startswith("in_blocks.") for k in keys) and "patch_embed.proj.weight" in keys:
        return "uvit"
    raise ValueError(f"unrecognised checkpoint layout (first keys: {sorted(keys)[:6]}); known formats: "
                     f"{', '.join(IMPORTERS.names())}")


def import_checkpoint(state_dict, args, name=None):
    """(description, state dict in our layout) of a foreign checkpoint, its format detected unless named."""
    return IMPORTERS.get(name or detect_format(state_dict))(state_dict, args)
