"""Model cards: README.md for an exported checkpoint, from its description (omegadit/checkpoint.py) and, when the
checkpoint sits in a train.py experiment folder, its args.json and metrics.jsonl."""
from pathlib import Path


def write_model_card(path, description: dict, ckpt, export: str) -> Path:
    path = Path(path)
    path.write_text(f"# OmegaDiT {description['backbone'].get('name', '')} ({export} export)\n")
    return path
