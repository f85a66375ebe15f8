"""What a folder of samples was made from: <sample-dir>/<name>/manifest.json, written by generate.py before the
first image and compared on every later run into the same folder, so that images of other weights, prompts or
sampling settings are never taken for the ones asked for.

A manifest is a flat JSON object. "checkpoint" (the resolved path of the weights file) is recorded for the reader
but not compared: the same weights moved or copied elsewhere give the same images. Every other key is compared.
"""
import hashlib
import json
from pathlib import Path

from utils import write_json

FILENAME = "manifest.json"
RECORDED_ONLY = ("checkpoint",)
CHUNK = 16 << 20


def digest(value) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_fingerprint(path) -> str:
    """sha256 of a whole file. About a second per GB, small next to sampling; hashing only some chunks would miss
    weights that changed in some layers only (a fine-tune of the last block)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def identity(manifest: dict) -> dict:
    """The compared part of a manifest."""
    return {k: v for k, v in manifest.items() if k not in RECORDED_ONLY}


def short_hash(manifest: dict) -> str:
    """8 hex digits naming the compared part, for default folder names."""
    return digest(identity(manifest))[:8]


def differences(old: dict, new: dict) -> list:
    """'key: old -> new' for every compared key whose value differs (`new` as it would read back from JSON)."""
    old, new = identity(old), identity(json.loads(json.dumps(new)))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def check_folder(folder, manifest: dict):
    """Raise when `folder` holds images that were not made from `manifest`: its manifest differs, or it has
    images and no manifest."""
    folder = Path(folder)
    images = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
    if images == 0:
        return
    path = folder / FILENAME
    if not path.is_file():
        raise FileExistsError(f"{folder} holds {images} images but no {FILENAME} (written before generate.py "
                              f"recorded its settings), so they cannot be checked against this run's: move them "
                              f"away, or choose another --name")
    changed = differences(json.loads(path.read_text()), manifest)
    if changed:
        raise FileExistsError(f"{folder} holds {images} images made with other settings ({path}); resuming would "
                              f"mix them with this run's. Differences (folder -> this run): {'; '.join(changed)}. "
                              f"Choose another --name, or leave --name out to get a folder named after the settings")


def write(folder, manifest: dict):
    """Write the manifest of `folder` (atomically)."""
    write_json(Path(folder) / FILENAME, manifest)
