"""How well generated shapes follow their masks: intersection over union of the shape's pixels with the mask.

The shape is segmented from the pixels as evaluations/alignment.py does (the largest connected component far from
the border colour, its threshold half way to the shape's colour); the mask's inside is its pixels at or above half
intensity (the shapes demo's silhouettes are anti-aliased). An image with no shape scores 0.

    python evaluations/mask_iou.py --images samples/NAME --masks data/control_eval/masks
    python evaluations/mask_iou.py --images samples/NAME.npz --masks data/control_eval/masks --images-per-mask 2

Image i is scored against mask (i // images-per-mask) mod #masks, the masks in name order: the mask generate.py
--mask-folder gave it.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evaluations.alignment import foreground  # noqa: E402

MASK_LEVEL = 128


def mask_iou(image, mask) -> float:
    """IoU of the shape segmented from `image` (H, W, 3) with `mask` (H, W) or (H, W, C) uint8 (inside: >= 128)."""
    mask = np.asarray(mask)
    inside = (mask.max(axis=-1) if mask.ndim == 3 else mask) >= MASK_LEVEL
    shape = foreground(image)
    if inside.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"mask of shape {inside.shape} for an image of shape {np.asarray(image).shape[:2]}")
    if shape is None:
        return 0.0
    union = np.logical_or(shape, inside).sum()
    return float(np.logical_and(shape, inside).sum() / union) if union else 1.0


def score_masks(images, masks, images_per_mask: int = 1) -> dict:
    """Mean and median IoU and the fraction of images with IoU >= 0.5 and >= 0.8; image i against mask
    (i // images_per_mask) mod len(masks)."""
    values = [mask_iou(image, masks[(i // images_per_mask) % len(masks)]) for i, image in enumerate(images)]
    if not values:
        raise ValueError("no images to score")
    values = np.array(values)
    return {"n": len(values), "iou_mean": float(values.mean()), "iou_median": float(np.median(values)),
            "iou_at_least_0.5": float((values >= 0.5).mean()), "iou_at_least_0.8": float((values >= 0.8).mean())}


def load_masks(folder) -> list:
    """The masks of a folder (subfolders included) in name order, as uint8 arrays."""
    from json_label_dataset import IMAGE_EXTENSIONS, list_files

    files = list_files(folder, IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{folder} holds no mask images")
    masks = []
    for rel in files:
        with Image.open(Path(folder) / rel) as image:
            masks.append(np.asarray(image.convert("L")))
    return masks


def load_images(path):
    """uint8 (H, W, 3) images of an .npz (arr_0) or of a folder of 000000.png, ... in index order."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["arr_0"]
    files = sorted((p for p in path.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not files:
        raise FileNotFoundError(f"{path} is neither an .npz nor a folder of PNGs named by index")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def main(argv=None):
    parser = argparse.ArgumentParser(description="IoU of generated shapes with their masks.")
    parser.add_argument("--images", required=True, help="folder of 000000.png, ... or an .npz (arr_0)")
    parser.add_argument("--masks", required=True, help="folder of the masks, in the order generate.py took them")
    parser.add_argument("--images-per-mask", type=int, default=1,
                        help="as generate.py --num-images-per-prompt: image i takes mask (i // K) mod #masks")
    parser.add_argument("--save-path", help="write the scores as JSON here")
    args = parser.parse_args(argv)
    scores = score_masks(load_images(args.images), load_masks(args.masks), args.images_per_mask)
    print(json.dumps(scores, indent=2))
    if args.save_path:
        Path(args.save_path).write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
