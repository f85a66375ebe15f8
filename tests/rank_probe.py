"""Runs train.py or generate.py under a launcher and records what each process did, for the multi-process tests.

    python -m torch.distributed.run --nproc_per_node 2 tests/rank_probe.py {train,generate} ARGS...

With PROBE_DIR set, every process writes there: for train, its own model weights at each checkpoint
(rank<R>_step<S>.pt); for generate, the names of the images it wrote (rank<R>_images.txt).
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
PROBE_DIR = Path(os.environ["PROBE_DIR"])


def probe_train(argv):
    import train

    save_checkpoint = train.save_checkpoint

    def save_and_record(accelerator, args, step, model, *rest):
        weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save(weights, PROBE_DIR / f"rank{accelerator.process_index}_step{step}.pt")
        return save_checkpoint(accelerator, args, step, model, *rest)

    train.save_checkpoint = save_and_record
    train.main(train.parse_args(argv))


def probe_generate(argv):
    import generate

    write_png = generate.write_png
    record = PROBE_DIR / f"rank{os.environ.get('RANK', '0')}_images.txt"

    def write_and_record(image, path):
        with open(record, "a") as f:
            f.write(path.name + "\n")
        write_png(image, path)

    generate.write_png = write_and_record
    generate.main(generate.parse_args(argv))


if __name__ == "__main__":
    PROBE_DIR.mkdir(parents=True, exist_ok=True)
    {"train": probe_train, "generate": probe_generate}[sys.argv[1]](sys.argv[2:])
