"""One self-describing weights file (omegadit/checkpoint.py) from a sharded checkpoint of `train.py --fsdp`,
in one process without GPUs or a launcher:

    python -m omegadit.consolidate exps/<exp>/checkpoints/<step> <step>_ema.safetensors [--weights model]

generate.py, app.py and `python -m omegadit.export` then take the file.
"""
import argparse
import json
from pathlib import Path

from omegadit import sharding
from omegadit.checkpoint import is_sharded, save_weights
from omegadit.run_state import holds_ema


def consolidate(checkpoint_dir, out, weights: str = "ema") -> Path:
    """Write the full `weights` ('ema' or 'model') of a sharded checkpoint to `out` with the run's description;
    'ema' falls back to the model's weights for a run that kept no EMA. Returns `out`."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    description_file = checkpoint_dir / "description.json"
    if not is_sharded(checkpoint_dir) or not description_file.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a sharded checkpoint of train.py --fsdp (it needs "
                                f"{sharding.SHARDED_DIR}/ and description.json)")
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the consolidated weights are written as .safetensors")
    if weights == "ema" and not holds_ema(checkpoint_dir):
        print(f"{checkpoint_dir} holds no EMA (trained with --no-ema): writing the model's weights")
        weights = "model"
    state = sharding.read_full(checkpoint_dir, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, state, json.loads(description_file.read_text()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder of train.py --fsdp (exps/<exp>/checkpoints/<step>)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="the EMA or the raw weights")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out, args.weights)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
