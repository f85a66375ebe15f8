"""Caption alignment of generated shapes-demo images, measured from the pixels.

For each image the foreground (pixels far from the border colour, largest connected component) gives:
- colour: the palette colour nearest its median pixel, allowing a blend with the background (blur dims colours);
- size: bounding-box extent relative to the image (small below demo.shapes.SIZE_THRESHOLD);
- position: bounding-box centre (centre within 1/6 of the middle on both axes, else the dominant direction);
- shape: from the soft coverage, whose third and fourth cumulants a symmetric blur leaves unchanged. A triangle
  is skewed (|skewness| 0.57 across its base); a square's fourth cumulant along the diagonals is half the one
  along the axes, a circle's is the same. Elongated blobs (bounding-box aspect > 1.5) match no shape.
Each is compared with the attributes parsed from the image's caption; images with no foreground are wrong on
every attribute. Class-conditional samples are scored the same way with their class names as prompts ("red
circle": colour and shape scored, size and position not).

    python evaluations/alignment.py --images samples/NAME --prompts data/holdout_prompts.txt --meta data/demo_meta.json
    python evaluations/alignment.py --images samples/NAME.npz --prompts prompts.txt --holdout "red triangle"
    python evaluations/alignment.py --images samples/classes.npz --class-names data/class_names.txt
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo.shapes import (  # noqa: E402
    ATTRIBUTES,
    CENTRE_RADIUS,
    PALETTE,
    SIZE_THRESHOLD,
    matches,
    parse_caption,
    parse_holdout,
)
from omegadit.prompts import read_prompts  # noqa: E402

FIRST_THRESHOLD = 60.0
MIN_THRESHOLD = 40.0
MIN_AREA = 0.004
MAX_ASPECT = 1.5
TRIANGLE_SKEW = 0.25
SQUARE_KURTOSIS_RATIO = 0.75
COLOUR_BLEND = (0.5, 1.2)
GROUPS = ("all", "seen", "held_out")
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _largest_component(mask):
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _as_rgb(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return image[..., :3].astype(np.float32)


def _background_distance(rgb):
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    return background, np.linalg.norm(rgb - background, axis=-1)


def _foreground(rgb, background, distance):
    mask = _largest_component(distance > FIRST_THRESHOLD)
    if mask is None:
        return None
    level = max(MIN_THRESHOLD, 0.5 * float(np.linalg.norm(np.median(rgb[mask], axis=0) - background)))
    mask = _largest_component(distance > level)
    if mask is None or mask.sum() < MIN_AREA * mask.size:
        return None
    return mask


def foreground(image):
    """Boolean mask of the shape (largest component far from the border colour), or None when empty."""
    rgb = _as_rgb(image)
    return _foreground(rgb, *_background_distance(rgb))


def _colour(pixel, background):
    """Palette colour whose blend line with the background passes closest to `pixel` (blur dims colours)."""
    direction = _PALETTE_RGB - background
    alpha = np.clip((direction @ (pixel - background)) / (direction * direction).sum(axis=1), *COLOUR_BLEND)
    residual = np.linalg.norm(background + alpha[:, None] * direction - pixel, axis=1)
    return _PALETTE_NAMES[int(np.argmin(residual))]


def _shape(rgb, mask, background, distance):
    region = ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED, iterations=max(2, round(0.03 * max(mask.shape))))
    floor = float(np.median(distance[~region])) if (~region).any() else 0.0
    full = float(np.linalg.norm(np.median(rgb[mask], axis=0) - background))
    weight = np.clip((distance - floor) / max(full - floor, 1e-6), 0.0, 1.0) * region
    ys, xs = np.indices(mask.shape, dtype=np.float64)
    total = weight.sum()
    skews, cumulants = [], []
    for ex, ey in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, -1.0)):
        proj = (xs * ex + ys * ey) / math.hypot(ex, ey)
        centred = proj - (weight * proj).sum() / total
        m2, m3, m4 = ((weight * centred**k).sum() / total for k in (2, 3, 4))
        skews.append(m3 / max(m2, 1e-12) ** 1.5)
        cumulants.append(m4 - 3 * m2**2)
    if max(abs(skews[0]), abs(skews[1])) >= TRIANGLE_SKEW:
        return "triangle"
    axis, diagonal = cumulants[0] + cumulants[1], cumulants[2] + cumulants[3]
    return "square" if axis < 0 and diagonal / axis < SQUARE_KURTOSIS_RATIO else "circle"


def measure(image):
    """Attributes seen in one (H, W, 3) image: dict(colour, shape, size, position), all None when empty."""
    rgb = _as_rgb(image)
    background, distance = _background_distance(rgb)
    mask = _foreground(rgb, background, distance)
    if mask is None:
        return dict.fromkeys(ATTRIBUTES)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1

    core = ndimage.binary_erosion(mask, structure=_EIGHT_CONNECTED)
    pixels = rgb[core] if core.sum() >= 4 else rgb[mask]
    colour = _colour(np.median(pixels, axis=0), background)

    if max(box_w, box_h) / min(box_w, box_h) > MAX_ASPECT:
        shape = "unknown"
    else:
        shape = _shape(rgb, mask, background, distance)

    size = "small" if max(box_w / width, box_h / height) < SIZE_THRESHOLD else "large"

    dx = (xs.min() + xs.max() + 1) / (2 * width) - 0.5
    dy = (ys.min() + ys.max() + 1) / (2 * height) - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_RADIUS:
        position = "centre"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return {"colour": colour, "shape": shape, "size": size, "position": position}


def _summary(records):
    summary = {"n": len(records)}
    for attribute in ATTRIBUTES + ("all_attributes",):
        hits = [record[attribute] for record in records if record[attribute] is not None]
        summary[attribute] = float(np.mean(hits)) if hits else None
    return summary


def score(images, prompts, holdout=()):
    """Per-attribute accuracy of `images` against `prompts`, for all, seen and held-out prompts.

    images: iterable of (H, W, 3) uint8 arrays, in the order of `prompts`. holdout: combinations such as
    "red triangle" (strings or attribute dicts). Attributes a prompt does not name are not scored.
    """
    specs = [parse_holdout(spec) if isinstance(spec, str) else dict(spec) for spec in holdout]
    groups = {name: [] for name in GROUPS}
    count = 0
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        wanted = parse_caption(prompt)
        if all(value is None for value in wanted.values()):
            raise ValueError(f"prompt {index} ({prompt!r}) names no colour, shape, size or position")
        seen = measure(image)
        record = {a: (None if wanted[a] is None else seen[a] == wanted[a]) for a in ATTRIBUTES}
        record["all_attributes"] = all(record[a] for a in ATTRIBUTES if record[a] is not None)
        held_out = any(matches(wanted, spec) for spec in specs)
        groups["all"].append(record)
        groups["held_out" if held_out else "seen"].append(record)
        count += 1
    if count != len(prompts):
        raise ValueError(f"got {count} images for {len(prompts)} prompts")
    return {name: _summary(records) for name, records in groups.items()}


def _load_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_samples(images, prompts=None, images_per_prompt=1):
    """(images: array or lazy iterable of (H, W, 3) uint8, their prompts) from a PNG folder, an npz or a JSON list.

    A folder holds 000000.png, 000001.png, ...; an npz holds arr_0 (N, H, W, 3). Image i takes the prompt
    generate.py gave it: each prompt repeated `images_per_prompt` times, the list cycled. A JSON file lists
    {"file": ..., "prompt": ...} (files relative to the JSON file) and needs no prompts file.
    """
    images = Path(images)
    if images.suffix == ".json":
        items = json.loads(images.read_text())
        if not isinstance(items, list) or not all(isinstance(i, dict) and {"file", "prompt"} <= set(i) for i in items):
            raise ValueError(f"{images}: expected a JSON list of {{'file': ..., 'prompt': ...}} objects")
        paths = [images.parent / item["file"] for item in items]
        return (_load_png(p) for p in paths), [item["prompt"] for item in items]
    if prompts is None:
        raise ValueError(f"a prompts file is required to score {images}")
    expanded = [p for p in read_prompts(prompts) for _ in range(images_per_prompt)]
    if images.suffix == ".npz":
        with np.load(images) as data:
            if "arr_0" not in data:
                raise ValueError(f"{images} has no arr_0 array")
            array = data["arr_0"]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{images}: arr_0 must be (N, H, W, 3), got {array.shape}")
        return array, [expanded[i % len(expanded)] for i in range(len(array))]
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is not a folder of PNGs, an .npz or a .json list")
    files = sorted((p for p in images.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not files:
        raise ValueError(f"{images} holds no PNGs named by index (000000.png, ...)")
    return (_load_png(p) for p in files), [expanded[int(p.stem) % len(expanded)] for p in files]


def load_class_samples(images, class_names):
    """(images, prompts) of class-conditional samples as generate.py --balanced-sampling writes them: image i is of
    class i mod K and its prompt is that class's name, line i mod K of `class_names` (demo.shapes --class-labels
    writes class_names.txt). Images may be a PNG folder, an npz or a JSON list, as in load_samples."""
    return load_samples(images, class_names, images_per_prompt=1)


def format_table(scores):
    """Plain-text table of a `score` result."""
    columns = ("n",) + ATTRIBUTES + ("all_attributes",)
    lines = [f"{'group':<10}" + "".join(f"{c:>16}" for c in columns)]
    for group, summary in scores.items():
        cells = [f"{summary['n']:>16d}"]
        cells += [f"{'-':>16}" if summary[c] is None else f"{summary[c]:>16.3f}" for c in columns[1:]]
        lines.append(f"{group:<10}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score shapes-demo images against their captions.")
    parser.add_argument("--images", required=True, help="folder of 000000.png..., an .npz (arr_0) or a .json list")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", help="one caption per line in image index order, or a labels.json / JSON list")
    prompts.add_argument("--class-names", help="class-conditional samples (generate.py --balanced-sampling): line k "
                                               "names class k, e.g. 'red circle'; image i is of class i mod K")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="as generate.py --num-images-per-prompt: image i takes prompt (i // K) mod #prompts")
    parser.add_argument("--meta", help="demo_meta.json of the training set: its held-out combinations are used")
    parser.add_argument("--holdout", action="append", default=[], help='held-out combination, e.g. "red triangle"')
    parser.add_argument("--save-path", help="write the scores as JSON here")
    args = parser.parse_args(argv)

    holdout = list(args.holdout)
    if args.meta:
        meta = json.loads(Path(args.meta).read_text())
        if "holdout" not in meta:
            raise ValueError(f"{args.meta} has no 'holdout' list")
        holdout += meta["holdout"]
    if args.class_names:
        images, prompts = load_class_samples(args.images, args.class_names)
    else:
        images, prompts = load_samples(args.images, args.prompts, args.images_per_prompt)
    scores = score(images, prompts, holdout)
    print(format_table(scores))
    if args.save_path:
        Path(args.save_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_path).write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
