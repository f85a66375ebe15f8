"""`dataset_tools.py check`: scan a dataset fully (every latent, image, caption, the pairing by id and the latent
statistics) and list every problem with its file."""
from pathlib import Path

from dataset import read_class_labels
from json_label_dataset import IMAGE_EXTENSIONS, STATS_FILENAME, file_id, list_files, load_latent_stats, read_labels
from omegadit.data_checks import (common_value, image_content_problems, image_header_problems, npy_content_problems,
                                  npy_header_problems, problem)
from omegadit.files import UnsafeFileError

def _scan(root: Path, extensions, problems: list) -> dict:
    """{id: path} of the files under `root`; a missing folder and files sharing an id are problems."""
    if not root.is_dir():
        problems.append((root, "folder missing"))
        return {}
    found = {}
    for rel in list_files(root, extensions):
        key = file_id(rel)
        if key in found:
            problems.append((root / rel, f"has the id '{key}' of {found[key]} too"))
        else:
            found[key] = root / rel
    return found


def _label_source(data_dir: Path, label_file, caption_key: str, problems: list):
    """(kind, {id: label file}, label file) of the captions or class labels; None when they cannot be read."""
    caption_file = Path(label_file) if label_file else data_dir / "labels.json"
    candidates = [("caption", caption_file, lambda p: read_labels(p, caption_key))]
    if not label_file:
        candidates += [("label", data_dir / folder / "dataset.json", read_class_labels)
                       for folder in ("vae-in", "images")]
    for kind, path, read in candidates:
        if path.is_file():
            try:
                return kind, dict.fromkeys(read(path), path), path
            except ValueError as e:
                problems.append(problem(path, e))
                return None
    problems.append((caption_file, "missing (nor is there a vae-in/dataset.json of class labels)"))
    return None


def _pairing_problems(sources: dict) -> list:
    """One problem per id that lacks a file of some kind, reported at a file it does have."""
    problems = []
    for key in sorted(set().union(*(found for found, _ in sources.values()))):
        lacking = [f"no {kind} in {where}" for kind, (found, where) in sources.items() if key not in found]
        if lacking:
            present = next(found[key] for found, _ in sources.values() if key in found)
            problems.append((present, f"id '{key}' has {', '.join(lacking)}"))
    return problems


def _stats_problems(stats_file: Path, latent_shapes: dict) -> list:
    """Problems of the cached latent statistics: unreadable, unusable, or for another channel count."""
    if not stats_file.is_file():
        return []
    try:
        mean, _ = load_latent_stats(stats_file)
    except (ValueError, UnsafeFileError) as e:
        return [problem(stats_file, e)]
    shape = common_value(list(latent_shapes.values()))
    if shape is not None and mean.shape[0] != shape[0]:
        return [(stats_file, f"statistics for {mean.shape[0]} channels but the latents have {shape[0]}; delete it")]
    return []


def _npy_problems(paths, ndim: int, kind: str, squeeze_batch: bool = False):
    """(problems, {path: shape}) of .npy files: header checks, then a full load of those that pass them."""
    problems, shapes = npy_header_problems(paths, ndim, kind, squeeze_batch)
    flagged = {path for path, _ in problems}
    return problems + npy_content_problems([p for p in paths if p not in flagged]), shapes


def _image_problems(paths) -> list:
    """Problems of image files: header checks, then a full decode of those that pass them."""
    problems, _ = image_header_problems(paths)
    flagged = {path for path, _ in problems}
    return problems + image_content_problems([p for p in paths if p not in flagged])


def check_dataset(data_dir, label_file=None, caption_key: str = "en", text_emb_dir=None) -> dict:
    """Load every file of a dataset (images, latents, labels, text embeddings if present, statistics).

    Returns {'problems': [(path, message), ...], 'items': number of ids, 'counts': {kind: files}}.
    """
    data_dir = Path(data_dir)
    text_emb_dir = Path(text_emb_dir) if text_emb_dir else data_dir / "text-emb"
    problems = []
    sources = {"image": (_scan(data_dir / "images", IMAGE_EXTENSIONS, problems), data_dir / "images"),
               "latent": (_scan(data_dir / "vae-in", {".npy"}, problems), data_dir / "vae-in")}
    if text_emb_dir.is_dir():
        sources["text embedding"] = (_scan(text_emb_dir, {".npy"}, problems), text_emb_dir)
    labels = _label_source(data_dir, label_file, caption_key, problems)
    if labels is not None:
        sources[labels[0]] = (labels[1], labels[2])
    problems += _pairing_problems(sources)
    problems += _image_problems(list(sources["image"][0].values()))
    latent_problems, latent_shapes = _npy_problems(list(sources["latent"][0].values()), 3, "latents", True)
    problems += latent_problems
    if "text embedding" in sources:
        problems += _npy_problems(list(sources["text embedding"][0].values()), 2, "text embeddings")[0]
    problems += _stats_problems(data_dir / "vae-in" / STATS_FILENAME, latent_shapes)
    ids = set().union(*(found for found, _ in sources.values()))
    counts = {kind: len(found) for kind, (found, _) in sources.items()}
    return {"problems": problems, "items": len(ids), "counts": counts}


def _shard_item_problems(item: dict, meta: dict) -> list:
    """What is wrong with one stored item of a shard dataset (messages)."""
    import numpy as np

    from omegadit.shards import decode_image

    missing = [f for f in meta["fields"] if f not in item]
    if missing:
        return [f"no {', '.join(missing)} field"]
    messages = []
    for key in ("latent", "text_emb"):
        if key in item:
            array = np.asarray(item[key])
            if list(array.shape) != meta[f"{key}_shape"]:
                messages.append(f"{key} of shape {list(array.shape)}, the dataset's is {meta[f'{key}_shape']}")
            elif not np.isfinite(array).all():
                messages.append(f"{key} holds NaN or infinite values")
    if "image" in item:
        try:
            size = decode_image(item["image"]).shape[-1]
        except Exception as e:
            messages.append(f"image does not decode: {e}")
        else:
            if size != meta.get("image_size"):
                messages.append(f"image of {size} px, the dataset's are {meta.get('image_size')} px")
    return messages


def check_shards(source) -> dict:
    """Read every item of a shard dataset (omegadit/shards.py): its description, chunk files, and each item's
    fields, shapes, values and image. Returns what check_dataset returns."""
    from omegadit.shards import chunk_problems, import_litdata, read_meta

    try:
        meta = read_meta(source)
    except (FileNotFoundError, ValueError) as e:
        return {"problems": [problem(source, e)], "items": 0, "counts": {}}
    problems = chunk_problems(source)
    if problems:
        return {"problems": problems, "items": meta["num_items"], "counts": {}}
    reader = import_litdata().StreamingDataset(str(source))
    seen, count = set(), 0
    for index in range(meta["num_items"]):
        item = reader[index]
        where = f"{source} item {index} ('{item.get('id')}')"
        problems += [(where, message) for message in _shard_item_problems(item, meta)]
        if item.get("id") in seen:
            problems.append((where, "id stored twice"))
        seen.add(item.get("id"))
        count += 1
    return {"problems": problems, "items": count, "counts": {field: count for field in meta["fields"]}}
