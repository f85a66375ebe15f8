"""Self-describing checkpoints: the one module that writes and reads model weights.

A weights file is safetensors whose metadata key "omegadit" holds a JSON description of everything sampling
needs besides the weights:

    {"format": 1,
     "backbone": {"name": "SiT-B/1", "architecture": "sit", "config": {...}},
     "objective": {"name": "flow", "config": {...}},
     "conditioner": {"name": "text", "config": {"text_encoder": ..., "text_len": 77, "dropout": 0.1}},
     "autoencoder": "vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml",
     "latent_stats": {"mean": [...], "std": [...]},          # per channel; latents = raw * 1/std - mean/std
     "sampling": {"sampler": "sde", "num_steps": 50, ...}}  # defaults generate.py starts from

so that `load(path)` rebuilds the network, the objective and the conditioner with no training folder around.
A ControlNet checkpoint (train.py --control) holds the control branch only; its description is its base's plus

     "control": {"architecture": "transformer-control", "config": {...},
                 "base": {"backbone": {...}, "weights": "ema", "weights_sha256": "...", "path": "..."}}

and `load_control(path, base)` puts it around the base it was trained on, refusing any other base.
Files written before this format (metadata "config" only, with args.json beside) still load, and so do the
checkpoints other projects released (omegadit/importers.py).
"""
import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models import rebuild_backbone
from omegadit.conditioners import DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_LEN, build_conditioner
from omegadit.files import load_safetensors
from omegadit.objectives import build_objective
from omegadit.objectives.flow import DEFAULT_SHIFT_BASE
from omegadit.weights_io import load_state_dict_checked, read_weights_entry

FORMAT = 1
META_KEY = "omegadit"
DEFAULT_AUTOENCODER = "vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml"
SHARDED_DIR = "sharded"  # the shards of a train.py --fsdp checkpoint (omegadit/sharding.py)


def describe(backbone_name: str, model, objective, conditioner, autoencoder: str, latent_stats=None,
             sampling: Optional[dict] = None) -> dict:
    """The description stored with the weights (see the module docstring)."""
    description = {
        "format": FORMAT,
        "backbone": {"name": backbone_name, "architecture": model.architecture, "config": model.config},
        "objective": objective.describe(),
        "conditioner": conditioner.describe(),
        "autoencoder": autoencoder,
        "sampling": dict(sampling or {}),
    }
    if latent_stats is not None:
        mean, std = latent_stats
        description["latent_stats"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return description


def save_weights(path, state_dict: dict, description: dict):
    """Write a state dict as safetensors with `description` in its metadata."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(description)})


def load_weights(path) -> dict:
    """The tensors of a safetensors file; a missing or damaged file is named in the error."""
    return load_safetensors(path)


def read_metadata(path) -> dict:
    """The string metadata of a safetensors file."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def read_description(path) -> Optional[dict]:
    """The description of a weights file, or None for a file written before descriptions existed."""
    metadata = read_metadata(path)
    if META_KEY not in metadata:
        return None
    description = json.loads(metadata[META_KEY])
    if description.get("format", 0) > FORMAT:
        raise ValueError(f"{path} was written by a newer OmegaDiT (checkpoint format {description['format']}); "
                         f"this one reads format {FORMAT}")
    return description


class Loaded(NamedTuple):
    """A checkpoint ready for sampling: the network in eval mode, its objective and conditioner, the autoencoder
    spec, the latent statistics ((mean, std) tensors of shape (C, 1, 1), or None when unknown), the description,
    and which weights were loaded: 'ema', 'model' (the raw weights) or None when the file does not say."""
    model: torch.nn.Module
    objective: object
    conditioner: object
    autoencoder: str
    latent_stats: Optional[tuple]
    description: dict
    weights: Optional[str] = None


def build(description: dict, state_dict: dict, source) -> Loaded:
    """Rebuild every part a description names and load `state_dict` into the network."""
    backbone = description["backbone"]
    model = rebuild_backbone(backbone["architecture"], backbone["config"])
    load_state_dict_checked(model, state_dict, source, backbone.get("name", backbone["architecture"]))
    objective = build_objective(description["objective"]["name"], **description["objective"]["config"])
    conditioner = build_conditioner(description["conditioner"]["name"], **description["conditioner"]["config"])
    stats = description.get("latent_stats")
    latent_stats = None if stats is None else tuple(torch.tensor(stats[k]).reshape(-1, 1, 1) for k in ("mean", "std"))
    return Loaded(model.eval(), objective, conditioner, description.get("autoencoder", DEFAULT_AUTOENCODER),
                  latent_stats, description)


def is_sharded(path) -> bool:
    """Whether `path` is a checkpoint of an --fsdp run (shards instead of full weights)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def weights_file(path, use_ema: bool = True) -> Path:
    """The weights file of a checkpoint directory (ema.safetensors or model.safetensors; model.safetensors when a
    run that kept no EMA wrote it) or the file itself."""
    path = Path(path)
    if path.is_dir():
        weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
        if use_ema and not weights.exists() and (path / "model.safetensors").exists():
            weights = path / "model.safetensors"
        if not weights.exists() and is_sharded(path):
            raise FileNotFoundError(f"{path} holds only the shards of an --fsdp run: make one weights file with "
                                    f"python -m omegadit.consolidate {path} OUT.safetensors")
        if not weights.exists():
            raise FileNotFoundError(f"{path} is not a train.py checkpoint directory: {weights.name} is missing")
        return weights
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load(path, use_ema: bool = True, source_format: Optional[str] = None) -> Loaded:
    """Load a checkpoint directory or weights file of train.py (today's or an older one), or a checkpoint another
    project released (omegadit/importers.py: DiT, LightningDiT, U-ViT, the original OmegaDiT), its format
    detected from its keys unless `source_format` names it."""
    weights = weights_file(path, use_ema)
    if weights.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"{weights}: expected a checkpoint directory, a .safetensors, .pt or .pth file")
    if weights.suffix == ".safetensors" and source_format is None:
        metadata = read_metadata(weights)
        if META_KEY in metadata or "config" in metadata:
            description = read_description(weights) or _legacy_description(weights)
            if "control" in description:
                raise ValueError(f"{weights} is a ControlNet checkpoint (train.py --control), not a model: sample it "
                                 f"with generate.py --ckpt BASE --controlnet {path} --mask MASK, BASE being the model "
                                 f"it was trained on ({description['control']['base'].get('path')})")
            kind = {"ema.safetensors": "ema", "model.safetensors": "model"}.get(weights.name)
            return build(description, load_weights(weights), weights)._replace(weights=kind)
    from omegadit.importers import import_checkpoint

    state_dict, args, entry = read_weights_entry(weights, use_ema)
    description, converted = import_checkpoint(state_dict, args, source_format)
    return build(description, converted, weights)._replace(weights=entry)


def _read_args(weights: Path) -> dict:
    args_file = weights.parent / "args.json"
    return json.loads(args_file.read_text()) if args_file.exists() else {}


def _stats_of_data_dir(data_dir) -> Optional[dict]:
    from json_label_dataset import STATS_FILENAME, load_latent_stats

    stats_file = Path(data_dir) / "vae-in" / STATS_FILENAME if data_dir else None
    if stats_file is None or not stats_file.exists():
        return None
    mean, std = load_latent_stats(stats_file)
    return {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def _legacy_description(weights: Path) -> dict:
    """Describe a SiT weights file written before checkpoints carried descriptions, from its config metadata
    and the args.json train.py wrote beside it (latent statistics from its data folder, if still there)."""
    metadata = read_metadata(weights)
    if "config" not in metadata:
        raise ValueError(f"{weights} carries no model description: it was not written by OmegaDiT's train.py")
    config = json.loads(metadata["config"])
    return sit_description(config, _read_args(weights))


def sit_description(config: dict, args: dict) -> dict:
    text = config.get("text_dim") is not None
    conditioner = ({"name": "text", "config": {"text_encoder": args.get("clip_model_id") or DEFAULT_TEXT_ENCODER,
                                               "text_len": config.get("text_len", DEFAULT_TEXT_LEN)}}
                   if text else {"name": "class", "config": {"num_classes": config["num_classes"]}})
    description = {
        "format": FORMAT,
        "backbone": {"name": args.get("model", "SiT"), "architecture": "sit", "config": config},
        "objective": {"name": "flow", "config": {"path_type": args.get("path_type", "linear"),
                                                 "time_shifting": args.get("time_shifting", True),
                                                 "shift_base": args.get("shift_base", DEFAULT_SHIFT_BASE)}},
        "conditioner": conditioner,
        "autoencoder": args.get("tokenizer") or DEFAULT_AUTOENCODER,
        "sampling": {},
    }
    stats = _stats_of_data_dir(args.get("data_dir"))
    if stats is not None:
        description["latent_stats"] = stats
    return description


# ------------------------------------------------------------------------------------------------------------------
# ControlNet checkpoints
# ------------------------------------------------------------------------------------------------------------------

def describe_control(base: Loaded, base_path, control) -> dict:
    """The description of a control branch trained on the loaded checkpoint `base` (read from `base_path`)."""
    from models.control import weights_fingerprint

    return {**base.description, "control": {
        "architecture": control.architecture, "config": control.config,
        "base": {"backbone": base.description["backbone"], "weights": base.weights,
                 "weights_sha256": weights_fingerprint(base.model), "path": str(base_path)}}}


def check_control_base(description: dict, base_model, base_source, control_source, fingerprint=None):
    """Refuse a base network other than the one the control branch of `description` was trained on. `fingerprint`:
    the base weights' weights_fingerprint when the caller has it already (it hashes every weight)."""
    from models.control import weights_fingerprint

    recorded = description["control"]["base"]
    trained_on = (f"{recorded['backbone'].get('name', recorded['backbone']['architecture'])} "
                  f"({recorded.get('weights') or 'its'} weights of {recorded.get('path')})")
    config = json.loads(json.dumps(base_model.config))
    if base_model.architecture != recorded["backbone"]["architecture"] or config != recorded["backbone"]["config"]:
        raise ValueError(f"{control_source} is a ControlNet of another model: it was trained on {trained_on}, "
                         f"{base_source} is a {base_model.architecture} of another configuration")
    if (fingerprint or weights_fingerprint(base_model)) != recorded["weights_sha256"]:
        raise ValueError(f"{control_source} is a ControlNet of other weights: it was trained on {trained_on}; the "
                         f"weights of {base_source} differ (another checkpoint or step of the same model)")


def control_base_weights(path) -> Optional[str]:
    """Which weights of its base checkpoint a control branch was trained on: 'ema', 'model' or None (unknown)."""
    description = read_description(weights_file(path))
    return (description or {}).get("control", {}).get("base", {}).get("weights")


def load_control(path, base: Loaded, base_source, use_ema: bool = True) -> Loaded:
    """The control model of checkpoint `path` around the loaded base checkpoint `base` (read from `base_source`),
    after checking that it is the base the branch was trained on."""
    from models.control import rebuild_control

    weights = weights_file(path, use_ema)
    description = read_description(weights) if weights.suffix == ".safetensors" else None
    if not description or "control" not in description:
        raise ValueError(f"{weights} is not a ControlNet checkpoint (train.py --control writes them)")
    check_control_base(description, base.model, base_source, weights)
    control = description["control"]
    model = rebuild_control(control["architecture"], base.model, control["config"])
    load_state_dict_checked(model, load_weights(weights), weights, f"a {control['architecture']} branch")
    kind = {"ema.safetensors": "ema", "model.safetensors": "model"}.get(weights.name)
    return base._replace(model=model.eval(), description=description, weights=kind)
