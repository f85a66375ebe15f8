"""Runs several train.py commands one after another in the same launched processes (one launcher start, one
round of imports and one process group for all of them), for the multi-process tests:

    accelerate launch --num_processes 2 tests/train_sequence.py COMMANDS.json

COMMANDS.json holds a list of train.py argument lists.
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(commands_file):
    import train

    # Each run's end_training() would end the process group; the runs share it and it ends after the last one.
    keep_group = lambda self, group=None: None  # noqa: E731
    PartialState.destroy_process_group = AcceleratorState.destroy_process_group = keep_group
    for argv in json.loads(Path(commands_file).read_text()):
        AcceleratorState._reset_state()
        train.main(train.parse_args(argv))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
