"""What the demo's stages pass to the project's tools for a preset's conditioning.

Text presets (`conditioning` "text", the default: SiT, U-ViT text) train on the captions with the MiniLM text
encoder and sample the held-out and the seen prompts. Class presets (`conditioning` "class": DiT, LightningDiT,
U-ViT) train on the colour x shape class labels of `demo.shapes --class-labels` and sample every class
`images_per_prompt` times with generate.py --balanced-sampling (image i is of class i mod K); the samples are
scored with the class names as prompts, so colour and shape are scored and size and position are not.

The U-Net presets (`data_layout` "image-folder") train straight from the class folders of `demo.shapes
--class-folders` (data/classes/<kk>-<colour>-<shape>/), as DDPM and LDM users' ImageNet-style folders: train.py
makes the pixel latents as it reads the images, so nothing is encoded beforehand.

Preset keys read here besides those of the text presets: `conditioning`; `data_layout`; `sampler` (generate.py
--sampler) and `mode` (--mode), each passed when set, else the checkpoint's default sampler; `cfg_scale` None: the
checkpoint's default; `shift_base` None: not passed (objectives without time shifting refuse it); `train_flags`:
further train.py flags of the backbone's recipe.
"""
from demo.shapes import CLASS_NAMES

TEXT_GROUPS = (("held_out", "holdout_prompts.txt"), ("seen", "seen_prompts.txt"))
CLASS_GROUP = "classes"
GRID_TITLES = {"held_out": "held-out prompts", "seen": "seen prompts", CLASS_GROUP: "one per class"}


def is_class(s) -> bool:
    return s.get("conditioning", "text") == "class"


def uses_image_folder(s) -> bool:
    """Presets that train on data/classes, the image folder (see the module docstring)."""
    return s.get("data_layout") == "image-folder"


def data_flags(s) -> list:
    """demo.shapes flags: the held-out combinations, --class-labels for class presets (image-folder presets:
    --class-folders), --masks for ControlNet ones."""
    flags = [arg for combo in s["holdout"] for arg in ("--holdout", combo)]
    if uses_image_folder(s):
        return flags + ["--class-folders"]
    return flags + (["--class-labels"] if is_class(s) else []) + (["--masks"] if s.get("control") else [])


def train_data_dir(s, data):
    """train.py's --data-dir within the dataset folder `data`: the class folders or the encoded dataset."""
    return data / "classes" if uses_image_folder(s) else data


def data_summary(s) -> str:
    classes = f", {len(CLASS_NAMES)} classes (colour x shape)" if is_class(s) else ""
    return (f"{s['num_images']} images at {s['resolution']}px{classes}, held out: "
            f"{', '.join(s['holdout']) or 'none'}")


def train_flags(s) -> list:
    """train.py flags for the conditioning, the time shift and the preset's recipe."""
    if is_class(s):
        flags = ["--num-classes", len(CLASS_NAMES)]
    else:
        flags = ["--use-json-dataset", "--text-encoder", "minilm", "--text-len", s["text_len"]]
    if s.get("shift_base") is not None:
        flags += ["--shift-base", s["shift_base"]]
    return flags + list(s.get("train_flags", ()))


def sample_jobs(s, data):
    """[(group, prompts file that scores it, generate.py condition flags)] for the dataset folder `data`."""
    if is_class(s):
        return [(CLASS_GROUP, data / "class_names.txt",
                 ["--balanced-sampling", "--num-fid-samples", len(CLASS_NAMES) * s["images_per_prompt"],
                  "--grid-size", len(CLASS_NAMES)])]
    return [(group, data / name, ["--prompts-file", data / name, "--num-images-per-prompt", s["images_per_prompt"]])
            for group, name in TEXT_GROUPS]


def sampler_flags(s) -> list:
    """generate.py sampler flags: sampler, mode, step count and guidance scale where the preset sets them (None or
    absent: the checkpoint's defaults)."""
    flags = []
    for key, flag in (("sampler", "--sampler"), ("mode", "--mode"), ("sample_steps", "--num-steps"),
                      ("cfg_scale", "--cfg-scale")):
        if s.get(key) is not None:
            flags += [flag, s[key]]
    return flags


def images_per_prompt(s) -> int:
    """How many consecutive images share a line of the group's prompts file (class samples cycle the classes)."""
    return 1 if is_class(s) else s["images_per_prompt"]


def grid_lines(grids) -> list:
    """'sample grid (<title>): <path>' lines, the paths aligned."""
    labels = {group: f"sample grid ({GRID_TITLES.get(group, group)}):" for group in grids}
    width = max(map(len, labels.values()))
    return [f"{labels[group]:<{width}} {path}" for group, path in grids.items()]
