"""Deterministic captioned-shapes dataset: one coloured shape per image on a plain dark background.

Every caption names four attributes: colour, shape, size and position. Chosen attribute combinations
(e.g. "red triangle") can be held out of training to test compositional generalisation; the held-out and
seen prompt files are written next to the dataset for evaluation with evaluations/alignment.py.

With --class-labels the images also get class labels for class-conditional models: one class per colour and
shape (8 x 3 = 24, CLASS_NAMES: "red circle", "red square", ...), size and position varying within a class. They
are written as images/dataset.json ({"labels": [[file, class], ...]}, the layout that
`preprocessing/dataset_tools.py encode-vavae` carries over to vae-in/dataset.json, which dataset.py reads), and
the class names as class_names.txt (line k names class k). With --class-folders the same images are also laid
out as the ImageNet-style image folder that train.py reads directly: classes/<kk>-<colour>-<shape>/<name>.png
(class k is the k-th folder in sorted order, as image folders number their classes).

    python -m demo.shapes --out demo_runs/shapes --num 2000 --holdout "red triangle" --holdout "blue circle"
    python -m demo.shapes --out demo_runs/classes --num 2000 --class-labels
    python -m demo.shapes --out demo_runs/folders --num 2000 --class-folders

    python -m demo.shapes --out demo_runs/masked --num 2000 --masks

With --masks every image also gets its mask, the shape's silhouette (grayscale, 255 inside, anti-aliased edges), as
masks/<same id>.png for ControlNet training (train.py --control), and control_eval/ holds masks of shapes drawn
afresh (masks/NNNNNN.png) with the caption of each (prompts.txt, line i for mask i) to sample and score mask
following (evaluations/mask_iou.py).
"""
import argparse
import concurrent.futures
import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (30, 30, 30)
PALETTE = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 235, 40),
    "green": (40, 190, 50),
    "cyan": (30, 210, 220),
    "blue": (40, 80, 240),
    "purple": (200, 50, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES = ("colour", "shape", "size", "position")
VALUES = {"colour": tuple(PALETTE), "shape": SHAPES, "size": SIZES, "position": POSITIONS}

# Geometry, as fractions of the image side. The extent is the side of the shape's bounding box; the shape's
# bounding-box centre lies in the left/right/top/bottom third of the image (and near the middle on the other
# axis), or near the middle on both axes for "centre". The scorer splits sizes at SIZE_THRESHOLD and calls a
# position "centre" when the centre is within CENTRE_RADIUS of the middle on both axes.
SIZE_RANGES = {"small": (0.22, 0.28), "large": (0.44, 0.52)}
SIZE_THRESHOLD = 0.36
CENTRE_RADIUS = 1 / 6
EDGE_MARGIN = 0.03
CROSS_JITTER = 0.08
SUPERSAMPLE = 4

COLOUR_WORDS = {name: (name,) for name in PALETTE}
COLOUR_WORDS["purple"] = ("purple", "magenta")
SHAPE_WORDS = {name: (name,) for name in SHAPES}
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
WHERE = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
WHERE_IMAGE = {
    "left": ("on the left of the image",),
    "right": ("on the right of the image",),
    "top": ("at the top of the image",),
    "bottom": ("at the bottom of the image",),
    "centre": ("in the centre of the image", "in the center of the image", "in the middle of the image"),
}
WHERE_SHORT = {
    "left": ("left side",),
    "right": ("right side",),
    "top": ("top",),
    "bottom": ("bottom",),
    "centre": ("centre", "center", "middle"),
}
TEMPLATES = (
    ("a {size} {colour} {shape} {where}", WHERE),
    ("a {size} {colour} {shape} {where}", WHERE_IMAGE),
    ("{colour} {shape}, {size}, {where}", WHERE_SHORT),
    ("a {colour} {shape}, {size}, {where}", WHERE),
    ("{size} {colour} {shape} {where}", WHERE_IMAGE),
    ("a picture of a {size} {colour} {shape} {where}", WHERE),
)

# Class-conditional labels: the class fixes colour and shape.
CLASS_ATTRIBUTES = ("colour", "shape")
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in PALETTE for shape in SHAPES)

_EXTRA_WORDS = {
    "little": ("size", "small"),
    "upper": ("position", "top"),
    "lower": ("position", "bottom"),
}
_FILLER = {"a", "an", "the", "on", "in", "at", "of", "near", "side", "image", "and"}


def _build_vocabulary():
    vocabulary = dict(_EXTRA_WORDS)
    families = (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS), ("size", SIZE_WORDS), ("position", WHERE_SHORT))
    for attribute, words in families:
        for value, synonyms in words.items():
            for phrase in synonyms:
                vocabulary[phrase.split()[0]] = (attribute, value)
    return vocabulary


VOCABULARY = _build_vocabulary()


def _fix_articles(text):
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def phrasings(attrs):
    """Every caption the generator can write for one attribute dict (colour, shape, size, position)."""
    captions = []
    for template, where in TEMPLATES:
        for colour, size, place in itertools.product(
            COLOUR_WORDS[attrs["colour"]], SIZE_WORDS[attrs["size"]], where[attrs["position"]]
        ):
            text = template.format(colour=colour, shape=SHAPE_WORDS[attrs["shape"]][0], size=size, where=place)
            captions.append(_fix_articles(text))
    return captions


def caption(attrs, rng):
    """One caption for `attrs`, drawn uniformly from `phrasings(attrs)` with a numpy Generator."""
    options = phrasings(attrs)
    return options[int(rng.integers(len(options)))]


def parse_caption(text):
    """Attributes named in a caption: dict(colour, shape, size, position), None where one is not named.

    Raises ValueError when a caption names two different values of the same attribute.
    """
    found = dict.fromkeys(ATTRIBUTES)
    for word in re.findall(r"[a-z]+", text.lower()):
        if word not in VOCABULARY:
            continue
        attribute, value = VOCABULARY[word]
        if found[attribute] not in (None, value):
            raise ValueError(f"caption {text!r} names two values of {attribute}: {found[attribute]} and {value}")
        found[attribute] = value
    return found


def parse_holdout(text):
    """A held-out combination such as "red triangle" or "small left" -> dict of the attributes it fixes."""
    unknown = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in VOCABULARY and w not in _FILLER]
    if unknown:
        raise ValueError(f"held-out combination {text!r}: unknown words {unknown}")
    spec = {key: value for key, value in parse_caption(text).items() if value is not None}
    if not spec:
        raise ValueError(f"held-out combination {text!r} names no colour, shape, size or position")
    return spec


def matches(attrs, spec):
    """True when `attrs` has every attribute value fixed by `spec`."""
    return all(attrs.get(key) == value for key, value in spec.items())


def all_combinations():
    """All colour x shape x size x position attribute dicts, in a fixed order."""
    return [dict(zip(ATTRIBUTES, values)) for values in itertools.product(*(VALUES[a] for a in ATTRIBUTES))]


def class_index(attrs):
    """The class of an attribute dict: CLASS_NAMES.index("<colour> <shape>")."""
    return CLASS_NAMES.index(" ".join(attrs[a] for a in CLASS_ATTRIBUTES))


def write_class_labels(out_dir, attributes):
    """images/dataset.json ({"labels": [["<id>.png", class], ...]}) of {image id: attribute dict}, and
    class_names.txt (CLASS_NAMES, one a line: the prompts that score samples of class 0, 1, ...)."""
    out_dir = Path(out_dir)
    labels = [[f"{image_id}.png", class_index(attrs)] for image_id, attrs in attributes.items()]
    (out_dir / "images" / "dataset.json").write_text(json.dumps({"labels": labels}) + "\n")
    (out_dir / "class_names.txt").write_text("".join(name + "\n" for name in CLASS_NAMES))


def write_class_folders(out_dir, attributes):
    """classes/<kk>-<colour>-<shape>/<name>.png: copies of the images of {image id: attribute dict} in one folder
    per class (all CLASS_NAMES, in their order when sorted by name), replacing an earlier classes/."""
    root = Path(out_dir) / "classes"
    empty = sorted(set(CLASS_NAMES) - {CLASS_NAMES[class_index(attrs)] for attrs in attributes.values()})
    if empty:
        raise ValueError(f"no images of the classes {', '.join(empty)} (held out, or too few images): an image "
                         f"folder numbers its classes by their folders, so every class needs images")
    if root.exists():
        shutil.rmtree(root)
    folders = [root / f"{k:02d}-{name.replace(' ', '-')}" for k, name in enumerate(CLASS_NAMES)]
    for folder in folders:
        folder.mkdir(parents=True)
    for image_id, attrs in attributes.items():
        shutil.copyfile(Path(out_dir) / "images" / f"{image_id}.png",
                        folders[class_index(attrs)] / f"{Path(image_id).name}.png")


def _position_ranges(extent, position):
    half = extent / 2
    near = (half + EDGE_MARGIN, 1 / 3 - EDGE_MARGIN)
    far = (2 / 3 + EDGE_MARGIN, 1 - half - EDGE_MARGIN)
    middle = (0.5 - CROSS_JITTER, 0.5 + CROSS_JITTER)
    return {
        "left": (near, middle),
        "right": (far, middle),
        "top": (middle, near),
        "bottom": (middle, far),
        "centre": (middle, middle),
    }[position]


def canonical_geometry(size, position):
    """Middle-of-range (extent, cx, cy) for a size and position."""
    extent = sum(SIZE_RANGES[size]) / 2
    (x_lo, x_hi), (y_lo, y_hi) = _position_ranges(extent, position)
    return extent, (x_lo + x_hi) / 2, (y_lo + y_hi) / 2


def sample_geometry(size, position, rng):
    """Random (extent, cx, cy) for a size and position, rounded to 4 decimals."""
    extent = round(float(rng.uniform(*SIZE_RANGES[size])), 4)
    (x_lo, x_hi), (y_lo, y_hi) = _position_ranges(extent, position)
    return extent, round(float(rng.uniform(x_lo, x_hi)), 4), round(float(rng.uniform(y_lo, y_hi)), 4)


def sample_attributes(rng, combos=None):
    """A random attribute dict (uniform over `combos`, default all) with sampled geometry."""
    combos = all_combinations() if combos is None else combos
    attrs = dict(combos[int(rng.integers(len(combos)))])
    attrs["extent"], attrs["cx"], attrs["cy"] = sample_geometry(attrs["size"], attrs["position"], rng)
    return attrs


def _render_image(attrs, resolution, mode="RGB", background=BACKGROUND, fill=None):
    if "extent" in attrs:
        extent, cx, cy = attrs["extent"], attrs["cx"], attrs["cy"]
    else:
        extent, cx, cy = canonical_geometry(attrs["size"], attrs["position"])
    side = resolution * SUPERSAMPLE
    canvas = Image.new(mode, (side, side), background)
    draw = ImageDraw.Draw(canvas)
    x0, x1 = round((cx - extent / 2) * side), round((cx + extent / 2) * side) - 1
    y0, y1 = round((cy - extent / 2) * side), round((cy + extent / 2) * side) - 1
    fill = PALETTE[attrs["colour"]] if fill is None else fill
    if attrs["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {attrs['shape']!r}; expected one of {SHAPES}")
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def render(attrs, resolution=64):
    """Render one image (H, W, 3) uint8 from colour/shape/size/position (+ optional extent, cx, cy)."""
    return np.asarray(_render_image(attrs, resolution))


def _render_mask(attrs, resolution):
    return _render_image(attrs, resolution, mode="L", background=0, fill=255)


def render_mask(attrs, resolution=64):
    """The silhouette of the shape `render` draws: (H, W) uint8, 255 inside, anti-aliased edges."""
    return np.asarray(_render_mask(attrs, resolution))


def write_control_eval(out_dir, count, resolution, combos, rng):
    """control_eval/masks/NNNNNN.png (silhouettes of `count` shapes drawn from `combos`) and control_eval/prompts.txt
    (a caption of each, line i for mask i)."""
    folder = Path(out_dir) / "control_eval"
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        attrs = sample_attributes(rng, combos)
        _render_mask(attrs, resolution).save(folder / "masks" / f"{index:06d}.png", format="PNG")
        lines.append(caption(attrs, rng))
    (folder / "prompts.txt").write_text("".join(line + "\n" for line in lines))


def _prompt_lines(groups, count, rng):
    groups = [[group[i] for i in rng.permutation(len(group))] for group in groups if group]
    if not groups or count <= 0:
        return []
    lines = []
    for k in range(count):
        group = groups[k % len(groups)]
        lines.append(caption(group[(k // len(groups)) % len(group)], rng))
    return lines


def _write_files(items, out_dir, resolution, masks):
    """Render and save images/<id>.png (and with `masks` masks/<id>.png) of [(id, attributes)]."""
    for image_id, attrs in items:
        _render_image(attrs, resolution).save(out_dir / "images" / f"{image_id}.png", format="PNG")
        if masks:
            _render_mask(attrs, resolution).save(out_dir / "masks" / f"{image_id}.png", format="PNG")


def render_files(items, out_dir, resolution, masks, workers):
    """_write_files over `workers` processes (0 or 1: this one). Rendering depends on the attributes alone, so the
    files are the same whatever the number of workers."""
    chunk = 500
    if workers <= 1 or len(items) <= chunk:
        _write_files(items, out_dir, resolution, masks)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(_write_files, items[i:i + chunk], out_dir, resolution, masks)
                for i in range(0, len(items), chunk)]
        for job in jobs:
            job.result()


def make_dataset(out_dir, num, resolution=64, seed=0, holdout=(), num_prompts=64, per_folder=1000, overwrite=False,
                 class_labels=False, class_folders=False, masks=False, workers=0):
    """Write a shapes dataset to `out_dir` and return its metadata dict.

    Writes images/data_XXXXXX/img_XXXXXXXX.png, labels.json ([{"id", "en"}], no held-out combination),
    holdout_prompts.txt and seen_prompts.txt (`num_prompts` captions each) and demo_meta.json; with
    `class_labels` also images/dataset.json and class_names.txt (write_class_labels), with `class_folders` also
    the image folder classes/ (write_class_folders); with `masks` the silhouettes masks/<id>.png and control_eval/
    (`num_prompts` masks of new shapes and their captions; write_control_eval). `workers` processes render the
    images (0: this one). The same arguments give byte-identical files, whatever the number of workers.
    """
    out_dir = Path(out_dir)
    image_root = out_dir / "images"
    if image_root.exists() and any(image_root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{image_root} is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(image_root)
        for folder in ("masks", "control_eval"):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
    if num < 0 or resolution < 8 or per_folder < 1:
        raise ValueError(f"need num >= 0, resolution >= 8, per_folder >= 1 (got {num}, {resolution}, {per_folder})")
    holdout = list(holdout)
    specs = [parse_holdout(text) for text in holdout]
    combos = all_combinations()
    train_combos = [c for c in combos if not any(matches(c, spec) for spec in specs)]
    if not train_combos:
        raise ValueError(f"held-out combinations {holdout} leave no combination for training")

    rng = np.random.default_rng([seed, 0])
    labels, attributes = [], {}
    for index in range(num):
        attrs = sample_attributes(rng, train_combos)
        image_id = f"data_{index // per_folder:06d}/img_{index:08d}"
        labels.append({"id": image_id, "en": caption(attrs, rng)})
        attributes[image_id] = attrs
    image_root.mkdir(parents=True, exist_ok=True)
    folders = {image_id.split("/")[0] for image_id in attributes}
    for root in [image_root, *([out_dir / "masks"] if masks else [])]:
        for folder in folders:
            (root / folder).mkdir(parents=True, exist_ok=True)
    render_files(list(attributes.items()), out_dir, resolution, masks, workers)

    prompt_rng = np.random.default_rng([seed, 1])
    held = _prompt_lines([[c for c in combos if matches(c, spec)] for spec in specs], num_prompts, prompt_rng)
    seen = _prompt_lines([train_combos], num_prompts, prompt_rng)
    meta = {
        "seed": seed,
        "resolution": resolution,
        "num": num,
        "holdout": holdout,
        "holdout_attributes": specs,
        "background": list(BACKGROUND),
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "attributes": attributes,
    }
    if class_labels or class_folders:
        write_class_labels(out_dir, attributes)
        meta["classes"] = list(CLASS_NAMES)
    if class_folders:
        write_class_folders(out_dir, attributes)
    if masks:
        write_control_eval(out_dir, num_prompts, resolution, train_combos, np.random.default_rng([seed, 2]))
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (out_dir / "holdout_prompts.txt").write_text("".join(line + "\n" for line in held))
    (out_dir / "seen_prompts.txt").write_text("".join(line + "\n" for line in seen))
    (out_dir / "demo_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the captioned shapes demo dataset.")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--num", type=int, default=2000, help="number of training images")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", action="append", default=[],
                        help='attribute combination kept out of training, e.g. "red triangle" (repeatable)')
    parser.add_argument("--num-prompts", type=int, default=64,
                        help="captions in each of holdout_prompts.txt and seen_prompts.txt")
    parser.add_argument("--per-folder", type=int, default=1000, help="images per images/data_XXXXXX folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/images folder")
    parser.add_argument("--class-labels", action="store_true",
                        help="also write class labels (colour x shape, 24 classes) as images/dataset.json and "
                             "their names as class_names.txt")
    parser.add_argument("--class-folders", action="store_true",
                        help="--class-labels, and the images also in one folder per class under OUT/classes (the "
                             "image-folder layout train.py reads directly)")
    parser.add_argument("--masks", action="store_true",
                        help="also write each image's silhouette as masks/<id>.png, and control_eval/ (masks of new "
                             "shapes with their captions) for ControlNet training and scoring")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes rendering the images (default: min(8, CPU cores); 0: this one)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (got {args.workers})")
    start = time.perf_counter()
    make_dataset(args.out, args.num, resolution=args.resolution, seed=args.seed, holdout=args.holdout,
                 num_prompts=args.num_prompts, per_folder=args.per_folder, overwrite=args.overwrite,
                 class_labels=args.class_labels, class_folders=args.class_folders, masks=args.masks,
                 workers=args.workers)
    print(f"wrote {args.num} images ({args.resolution}px) to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
