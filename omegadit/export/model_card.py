"""Model cards: README.md for an exported checkpoint, from its description (omegadit/checkpoint.py) and, when the
checkpoint sits in a train.py experiment folder, its args.json and metrics.jsonl."""
from pathlib import Path

MARKER = "<!-- written by python -m omegadit.export -->"


def write_model_card(path, description: dict, ckpt, export: str, files=None, only_if_ours=False):
    path = Path(path)
    if only_if_ours and path.exists() and MARKER not in path.read_text(errors="replace"):
        return None
    path.write_text(f"{MARKER}\n# OmegaDiT {description['backbone'].get('name', '')} ({export} export)\n")
    return path
