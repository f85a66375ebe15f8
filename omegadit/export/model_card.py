"""Model cards: README.md for an exported checkpoint, from its description (omegadit/checkpoint.py) and, when the
checkpoint sits in a train.py experiment folder (exps/<name>/checkpoints/<step>/), that folder's args.json (the
recipe) and metrics.jsonl (losses, and FID when train.py evaluated during training)."""
import json
import math
from pathlib import Path
from typing import Optional

MARKER = "<!-- written by python -m omegadit.export -->"

RECIPE_KEYS = (  # (args.json key, label), in the order shown
    ("model", "model"), ("batch_size", "global batch size"), ("max_train_steps", "training steps (planned)"),
    ("learning_rate", "learning rate"), ("lr_schedule", "LR schedule"), ("lr_warmup_steps", "LR warm-up steps"),
    ("adam_weight_decay", "weight decay"), ("max_grad_norm", "gradient clipping"), ("ema_decay", "EMA decay"),
    ("mixed_precision", "mixed precision"), ("cfg_prob", "condition dropout"), ("enc_type", "REPA encoders"),
    ("proj_coeff", "REPA loss weight"), ("cfm_coeff", "contrastive flow matching weight"),
    ("path_drop_prob", "SPRINT path drop"), ("sprint_drop_ratio", "SPRINT token drop"), ("seed", "seed"),
)
ARCHITECTURE_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                     "qk_norm", "text_dim", "text_len", "num_classes")


def find_upwards(ckpt, name: str) -> Optional[Path]:
    """The file `name` in the checkpoint's folder or the nearest of three folders above it (train.py keeps
    args.json in each checkpoint folder and in the experiment folder, metrics.jsonl in the experiment folder)."""
    path = Path(ckpt).resolve()
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *list(folder.parents)[:3]]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def checkpoint_step(ckpt) -> Optional[int]:
    """The step of a train.py checkpoint folder (its name: 0400000), or None."""
    path = Path(ckpt)
    name = path.name if path.is_dir() else path.parent.name
    return int(name) if name.isdigit() else None


def read_metrics(path: Optional[Path], step: Optional[int]) -> dict:
    """The last training record (losses) and the last evaluation record (fid, ...) of metrics.jsonl at or before
    `step`: {"train": record or None, "eval": record or None}."""
    found = {"train": None, "eval": None}
    if path is None or not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or (step is not None and record.get("step", 0) > step):
            continue
        found["eval" if any(k.startswith("fid") for k in record) else "train"] = record
    return found


def parameter_count(description: dict) -> Optional[int]:
    """Parameters of the described backbone (built on the meta device: no memory, no weights)."""
    try:
        import torch

        from models import rebuild_backbone
        with torch.device("meta"):
            model = rebuild_backbone(description["backbone"]["architecture"], description["backbone"]["config"])
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a card without the count is better than no card
        return None


def _value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _table(rows) -> list:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in rows if value is not None]
    return lines


def _usage(export: str, conditioning: str, files) -> list:
    if export == "diffusers":
        call = ('pipe(["a red circle on the left"], num_inference_steps=50, guidance_scale=4.0, seed=0)'
                if conditioning == "text" else "pipe(class_labels=[207, 360], num_inference_steps=50, seed=0)")
        return ["```python",
                "import omegadit.export.diffusers_pipeline  # from an OmegaDiT checkout: registers OmegaDiTPipeline",
                "from diffusers import DiffusionPipeline", "",
                'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
                f"images = {call}.images", "```", "",
                "The scheduler runs Euler on the probability-flow ODE over the time grid generate.py uses; "
                "`sampler=\"sde\"` runs OmegaDiT's own SDE sampler (the checkpoint's default)."]
    names = ", ".join(f"`{f}`" for f in files or [])
    return [f"Files: {names}. The JSON file names the inputs and outputs of the ONNX graphs and holds the null "
            "condition and the time grid; see the OmegaDiT README, section \"ONNX\", for the sampling loop and the "
            "ONNX Runtime bindings of other languages."]


def model_card(description: dict, ckpt=None, export: str = "diffusers", files=None) -> str:
    """The model card text (Markdown with a Hugging Face metadata header)."""
    backbone = description["backbone"]
    config = backbone.get("config", {})
    conditioner = description.get("conditioner", {})
    objective = description.get("objective", {})
    sampling = description.get("sampling", {})
    args_file = find_upwards(ckpt, "args.json") if ckpt is not None else None
    args = json.loads(args_file.read_text()) if args_file else {}
    step = checkpoint_step(ckpt) if ckpt is not None else None
    metrics = read_metrics(find_upwards(ckpt, "metrics.jsonl") if ckpt is not None else None, step)
    conditioning = conditioner.get("name", "text")
    name = backbone.get("name") or backbone.get("architecture", "")
    params = parameter_count(description)

    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    lines = ["---", f"library_name: {'diffusers' if export == 'diffusers' else 'onnx'}",
             f"pipeline_tag: {pipeline_tag}", "tags:", "- omegadit", f"- {backbone.get('architecture', '')}",
             "- flow-matching" if objective.get("name", "").endswith("flow") else f"- {objective.get('name', '')}",
             "---", MARKER, "", f"# OmegaDiT {name}", "",
             f"A {'text' if conditioning == 'text' else 'class'}-conditional diffusion transformer trained with "
             f"OmegaDiT, exported for {'diffusers' if export == 'diffusers' else 'ONNX Runtime'}.", "",
             "## Architecture", ""]
    rows = [("backbone", f"{name} (`{backbone.get('architecture')}`)"),
            ("parameters", f"{params:,}" if params else None)]
    rows += [(key, _value(config[key])) for key in ARCHITECTURE_KEYS if config.get(key) is not None]
    rows += [("objective", f"`{objective.get('name')}` " + ", ".join(f"{k}={_value(v)}" for k, v in
                                                                     objective.get("config", {}).items())),
             ("autoencoder", _value(description.get("autoencoder"))),
             ("latent channels", str(len(description["latent_stats"]["mean"])) if description.get("latent_stats")
              else None)]
    if conditioning == "text":
        cc = conditioner.get("config", {})
        rows += [("text encoder", _value(cc.get("text_encoder"))), ("caption tokens", _value(cc.get("text_len")))]
    else:
        rows.append(("classes", _value(conditioner.get("config", {}).get("num_classes"))))
    lines += _table(rows)

    lines += ["", "## Data", ""]
    if args:
        data_rows = [("data folder", _value(args.get("data_dir"))),
                     ("captions", _value(args.get("label_file") or "labels.json") if args.get("use_json_dataset")
                      else "ImageNet-style class labels"),
                     ("cached caption embeddings", _value(args.get("text_emb_dir")) if args.get("text_emb_dir")
                      else None)]
        if config.get("input_size") and description.get("autoencoder", "").startswith("pixel"):
            patch = int(description["autoencoder"].partition(":")[2] or 4)
            data_rows.append(("image size", f"{config['input_size'] * patch} px"))
        lines += _table(data_rows)
    else:
        lines.append("Not recorded: the checkpoint was exported without the args.json of its training run.")

    lines += ["", "## Training", ""]
    train_rows = [("checkpoint step", str(step) if step is not None else None)]
    train_rows += [(label, _value(args[key])) for key, label in RECIPE_KEYS if key in args and args[key] is not None]
    if args.get("exp_name"):
        train_rows.insert(0, ("experiment", _value(args["exp_name"])))
    if len(train_rows) > 1 or step is not None:
        lines += _table(train_rows)
    else:
        lines.append("Not recorded (no args.json beside the checkpoint).")
    if args:
        lines += ["", "<details><summary>args.json (every train.py flag)</summary>", "", "```json",
                  json.dumps(args, indent=1, sort_keys=True, default=str), "```", "</details>"]

    lines += ["", "## Metrics", ""]
    metric_rows = []
    if metrics["eval"]:
        record = metrics["eval"]
        metric_rows += [(f"{k} (step {record.get('step')})", _value(v)) for k, v in record.items()
                        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
    if metrics["train"]:
        record = metrics["train"]
        metric_rows += [(f"{k} (step {record.get('step')})", _value(v)) for k, v in record.items()
                        if k.startswith("loss") and isinstance(v, (int, float))]
    lines += _table(metric_rows) if metric_rows else ["None recorded with the checkpoint (see "
                                                      "evaluations/evaluator.py for FID, sFID, IS, precision, recall)."]

    lines += ["", "## Sampling", ""]
    lines += _table([(key.replace("_", " "), _value(value)) for key, value in sampling.items()]) if sampling else [
        "The checkpoint records no sampling defaults (generate.py's: sde, 50 steps, guidance 4.0)."]
    lines += ["", "## Usage", "", *_usage(export, conditioning, files), ""]
    return "\n".join(lines)


def write_model_card(path, description: dict, ckpt=None, export: str = "diffusers", files=None,
                     only_if_ours: bool = False) -> Optional[Path]:
    """Write the model card to `path`; with only_if_ours, a README.md no export wrote is kept (returns None)."""
    path = Path(path)
    if only_if_ours and path.exists() and MARKER not in path.read_text(errors="replace"):
        return None
    path.write_text(model_card(description, ckpt, export, files))
    return path
