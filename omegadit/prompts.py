"""Prompt files: the one reader behind generate.py, train.py's sample grids and the alignment scorer."""
import json
from pathlib import Path


def read_prompts(path):
    """Captions from a text file (one per non-empty line, as generate.py reads it), a labels.json
    ([{"id", "en"}]) or a JSON list of strings or {"prompt": ...} dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
        prompts = [item if isinstance(item, str) else item.get("prompt", item.get("en")) for item in items]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: every entry must be a string or hold a 'prompt' or 'en' string")
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
