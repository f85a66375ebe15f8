"""The original OmegaDiT on our scripts: its command-line flags, and the recipes of configs/*.yaml.

Every flag of the original train.py, generate.py and evaluations/evaluator.py is accepted by ours. A flag both
have under one name is ours and not listed here; the others, in ORIGINAL_FLAGS, are one of

    alias    another spelling of a setting of ours (`--sampling-steps` is `--sample-every`);
    check    a fact about the data or the checkpoint (`--resolution`, `--model`): checked against them
             before any work starts, an error when it does not hold;
    ignored  means nothing here: prints one line saying why and changes nothing;
    silent   holds by construction (`--prediction v`) or is the launcher's (`--local-rank`): accepted quietly;
    name     evaluator.py: a part of the name of the original's metrics file (`--save_path`).

A recipe (`--recipe original` or `--recipe omegadit`) is a section of configs/<name>.yaml: its values become the
defaults of the script's flags, under `--config` and the command line. README.md ("Differences from the original
OmegaDiT") lists what the two recipes set and why.
"""
import argparse
import os
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from omegadit.options import record_preset_options

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "configs"
RECIPES = ("original", "omegadit")
ORIGINAL_PROMPTS = RECIPES_DIR / "original_prompts.txt"


class Flag(NamedTuple):
    """A flag of the original script that ours does not have under the same name."""
    names: tuple
    kind: str  # alias, check, ignored, silent, name
    kwargs: dict
    target: Optional[str] = None  # alias: the dest of our flag
    note: str = ""  # ignored: why


BOOL = dict(action=argparse.BooleanOptionalAction)
NO_CLS = "this SiT has no CLS token"

ORIGINAL_FLAGS = {
    "train": [
        Flag(("--logging-dir",), "ignored", dict(type=str), note="logs and trackers go to <output-dir>/<exp-name>"),
        Flag(("--sampling-steps",), "alias", dict(type=int), target="sample_every"),
        Flag(("--num-sample-steps",), "alias", dict(type=int), target="sample_steps"),
        Flag(("--fused-attn",), "ignored", BOOL, note="attention always runs through PyTorch's fused "
                                                       "scaled_dot_product_attention"),
        Flag(("--ops-head",), "ignored", dict(type=int), note="the original train.py never read it either"),
        Flag(("--resolution",), "check", dict(type=int)),
        Flag(("--vae-name",), "ignored", dict(type=str), note="the autoencoder of the latents is --tokenizer (the "
                                                              "original VA-VAE train.py ignored --vae-name too)"),
        Flag(("--epochs",), "ignored", dict(type=int), note="the length of a run is --max-train-steps"),
        Flag(("--prediction",), "silent", dict(type=str, choices=["v"])),
        Flag(("--cls",), "ignored", dict(type=float), note=f"the weight of a CLS-token loss: {NO_CLS} (and the "
                                                             f"original's text-to-image train.py no longer used it)"),
        Flag(("--cls-cfg-scale",), "ignored", dict(type=float), note=f"guidance of a CLS token: {NO_CLS}"),
    ],
    "generate": [
        Flag(("--model",), "check", dict(type=str)),
        Flag(("--num-classes",), "check", dict(type=int)),
        Flag(("--resolution",), "check", dict(type=int)),
        Flag(("--qk-norm",), "ignored", BOOL, note="the checkpoint says whether its attention has QK-norm (the "
                                                    "original generate.py never applied --qk-norm either)"),
        Flag(("--projector-embed-dims",), "check", dict(type=str)),
        Flag(("--path-type",), "check", dict(type=str, choices=["linear", "cosine"])),
        Flag(("--fused-attn",), "ignored", BOOL, note="attention always runs through PyTorch's fused "
                                                       "scaled_dot_product_attention"),
        Flag(("--latent-stats-dir",), "alias", dict(type=str), target="latent_stats"),
        Flag(("--cls-cfg-scale",), "ignored", dict(type=float), note=f"guidance of a CLS token: {NO_CLS}"),
        Flag(("--cls",), "ignored", dict(type=int), note=f"the width of a CLS token: {NO_CLS}"),
        Flag(("--local-rank", "--local_rank"), "silent", dict(type=int)),
    ],
    "evaluator": [
        Flag(("--ref_batch",), "alias", dict(type=str), target="ref_batch"),
        Flag(("--sample_batch",), "alias", dict(type=str), target="sample_batch"),
        Flag(("--save_path",), "silent", dict(type=str)),
        Flag(("--cfg_cond",), "name", dict(type=int)),
        Flag(("--step",), "name", dict(type=int)),
        Flag(("--cfg",), "name", dict(type=float)),
        Flag(("--cls_cfg",), "name", dict(type=float)),
        Flag(("--gh",), "name", dict(type=float)),
        Flag(("--num_steps",), "name", dict(type=int)),
    ],
}


def _dest(flag: Flag) -> str:
    return "original_" + flag.names[0].lstrip("-").replace("-", "_")


def given(args, name: str):
    """The value of the original flag `name` ('--resolution') on the command line, or None."""
    return getattr(args, "original_" + name.lstrip("-").replace("-", "_"), None)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def say(message: str) -> None:
    """One line on stdout, from the first process only."""
    if _is_main_process():
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------------------------

def add_original_flags(parser, script: str, recipes: bool = True):
    """Add `--recipe` (train, generate) and the original's flags that `script` lacks, in their own group."""
    if recipes:
        parser.add_argument("--recipe", default=None, choices=RECIPES,
                            help="defaults of a recipe, configs/<recipe>.yaml (under --config and the command line): "
                                 "'original' reproduces the original OmegaDiT, 'omegadit' restates our defaults")
    group = parser.add_argument_group(
        "flags of the original OmegaDiT", "accepted so that its command lines run here; each is mapped to ours, "
                                          "checked against the data or checkpoint, or ignored with a note")
    for flag in ORIGINAL_FLAGS[script]:
        group.add_argument(*flag.names, dest=_dest(flag), default=None, help=_help(flag), **flag.kwargs)
    return parser


def _help(flag: Flag) -> str:
    if flag.kind == "alias":
        return f"the original's name of --{flag.target.replace('_', '-')}"
    if flag.kind == "check":
        return "checked against the data or the checkpoint"
    if flag.kind == "ignored":
        return f"ignored: {flag.note}"
    if flag.kind == "name":
        return "a part of the --save_path metrics file's name, as in the original"
    return "accepted"


def read_recipe(name: str, script: str) -> dict:
    """The `script` section of configs/<name>.yaml ({} when the recipe says nothing about that script)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name!r}: {path} is missing")
    sections = yaml.safe_load(path.read_text()) or {}
    values = sections.get(script) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: section {script!r} must map flag names to values")
    return values


def apply_recipe(parser, argv, script: str) -> Optional[str]:
    """Make the values of `--recipe NAME` (if given in argv) the parser's defaults; returns the name."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=RECIPES)
    name = pre.parse_known_args(argv)[0].recipe
    parser.omegadit_recipe = None
    if name is None:
        return None
    actions = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in read_recipe(name, script).items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in actions:
            raise ValueError(f"configs/{name}.yaml: {script}: unknown key '{key}' (not a flag of {script})")
        defaults[dest] = value
    parser.set_defaults(**defaults)
    record_preset_options(parser, defaults)
    parser.omegadit_recipe = name
    return name


def resolve(parser, args, script: str):
    """Apply the aliases among the original flags given, print one line for each ignored one, and a hint when the
    original's flags come without `--recipe`. Returns args."""
    if script in ("train", "generate") and args.recipe != getattr(parser, "omegadit_recipe", None):
        parser.error("--recipe goes on the command line (a --config file cannot choose the recipe it overrides)")
    seen = []
    for flag in ORIGINAL_FLAGS[script]:
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        if flag.kind != "silent":
            seen.append(flag.names[0])
        if flag.kind == "alias":
            _apply_alias(parser, args, flag, value)
        elif flag.kind == "ignored":
            say(f"{flag.names[0]} (a flag of the original OmegaDiT) is ignored: {flag.note}")
    if script == "train" and args.qk_norm and (seen or args.recipe == "original"):
        say("--qk-norm adds QK-norm to the attention here; the original train.py accepted it but never applied it "
            "(its blocks always built attention without QK-norm): drop it to train the original's model")
    if script in ("train", "generate") and args.recipe is None and seen:
        what = ("cosine LR, no gradient clipping, no EMA, seed 23" if script == "train" else
                "250 SDE steps, CFG 2.5 up to t = 0.85, path drop in the unconditional branch, float32")
        say(f"flags of the original OmegaDiT given ({', '.join(seen)}); add --recipe original for its other "
            f"settings too ({what})")
    return args


def _apply_alias(parser, args, flag: Flag, value):
    ours = "--" + flag.target.replace("_", "-")
    if flag.target == "latent_stats" and Path(value).is_dir():
        value = str(Path(value) / "latents_stats.pt")
    current = getattr(args, flag.target, None)
    default = parser.get_default(flag.target)
    if current not in (None, default) and current != value:
        parser.error(f"{flag.names[0]} {value} and {ours} {current} disagree (they are one setting)")
    setattr(args, flag.target, value)


# ------------------------------------------------------------------------------------------------------------------
# Checks against the data and the checkpoint
# ------------------------------------------------------------------------------------------------------------------

def check_training_data(args, resolution: int, latent_shape) -> None:
    """train.py: the original's `--resolution` against the images of --data-dir."""
    wanted = given(args, "--resolution")
    if wanted is not None and wanted != resolution:
        raise ValueError(f"--resolution {wanted} but the images of {args.data_dir} are {resolution}x{resolution} "
                         f"(latents {tuple(latent_shape)}): encode the data at {wanted} px, or drop --resolution")


def check_checkpoint(args, loaded, downsample: int) -> None:
    """generate.py: the original's model flags against the checkpoint (and its autoencoder's downsampling); the
    first that does not hold is an error; --num-classes on a text model is ignored with a note."""
    from models import BACKBONES

    description = loaded.description
    config = getattr(loaded.model, "base", loaded.model).config  # a ControlNet's model flags are its base's
    problems = []
    name = given(args, "--model")
    held = description["backbone"].get("name")
    if name is not None and name != held:
        if held in BACKBONES.names() or name in BACKBONES.names():
            problems.append(f"--model {name}: {args.ckpt} holds a {held}")
    resolution = given(args, "--resolution")
    if resolution is not None:
        size = loaded.model.latent_shape[-1] * downsample
        if size != resolution:
            problems.append(f"--resolution {resolution}: {args.ckpt} makes {size}x{size} images")
    dims = given(args, "--projector-embed-dims")
    if dims is not None:
        wanted = [int(d) for d in dims.split(",") if d.strip()]
        if list(config.get("z_dims", [])) != wanted:
            problems.append(f"--projector-embed-dims {dims}: {args.ckpt} has REPA projectors for "
                            f"{list(config.get('z_dims', [])) or 'no encoder'}")
    path_type = given(args, "--path-type")
    held_path = loaded.objective.config.get("path_type")
    if path_type is not None and held_path is not None and path_type != held_path:
        problems.append(f"--path-type {path_type}: {args.ckpt} was trained on the {held_path} path")
    classes = given(args, "--num-classes")
    if classes is not None:
        if config.get("num_classes") is None or config.get("text_dim") is not None:
            say("--num-classes (a flag of the original OmegaDiT) is ignored: the checkpoint is text-conditioned")
        elif config["num_classes"] != classes:
            problems.append(f"--num-classes {classes}: {args.ckpt} has {config['num_classes']} classes")
    if problems:
        raise ValueError("the original OmegaDiT flags do not match the checkpoint: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------------------
# evaluator.py
# ------------------------------------------------------------------------------------------------------------------

def resolve_evaluator(parser, args):
    """evaluator.py: `--ref_batch` / `--sample_batch` stand for the two positional batches; the name parts of the
    original's metrics file mean nothing without `--save_path`."""
    for flag in ORIGINAL_FLAGS["evaluator"]:
        value = getattr(args, _dest(flag))
        if flag.kind == "alias" and value is not None:
            if getattr(args, flag.target) is not None:
                parser.error(f"the {flag.target.replace('_', ' ')} is given twice (positional and {flag.names[0]})")
            setattr(args, flag.target, value)
        elif flag.kind == "name" and value is not None and args.original_save_path is None:
            say(f"{flag.names[0]} (a flag of the original OmegaDiT) is ignored: it only names the "
                f"--save_path metrics file")
    for target in ("ref_batch", "sample_batch"):
        if getattr(args, target) is None:
            parser.error(f"the {target.replace('_', ' ')} .npz is missing (positional, or --{target})")
    return args


def original_metrics_path(args) -> Optional[Path]:
    """Where the original evaluator.py wrote its metrics for `--save_path P`: P followed by num_steps, step, cfg,
    gh and cls_cfg and 'cfg_cond_true.txt' (or false), joined as strings, with no separator; P is also created as
    a folder, as there. None without --save_path."""
    save_path = args.original_save_path
    if save_path is None:
        return None
    Path(save_path).mkdir(parents=True, exist_ok=True)
    parts = [args.original_num_steps, args.original_step, args.original_cfg, args.original_gh,
             args.original_cls_cfg]
    defaults = [250, 1, 1.0, 1.0, 1.0]  # the original evaluator.py's defaults
    cond = args.original_cfg_cond if args.original_cfg_cond is not None else 1
    name = "".join(str(v if v is not None else d) for v, d in zip(parts, defaults))
    return Path(save_path + name + ("cfg_cond_true.txt" if cond else "cfg_cond_false.txt"))


def write_original_metrics(path: Path, metrics: dict) -> None:
    """The original evaluator.py's text file: one 'Name: value' line per metric."""
    lines = [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
             ("Recall", "recall")]
    path.write_text("".join(f"{label}: {metrics[key]}\n" for label, key in lines))
