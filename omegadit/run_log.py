"""train.py's log: timestamped lines to the console and exps/<exp>/log.txt, metrics records to the console,
exps/<exp>/metrics.jsonl and the trackers; the main process writes, the others stay quiet."""
import json
import time

from tqdm.auto import tqdm


def make_logger(accelerator, exp_dir):
    """Console + exps/<exp>/log.txt logging from the main process only."""
    def log(message):
        if accelerator.is_main_process:
            exp_dir.mkdir(parents=True, exist_ok=True)
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            tqdm.write(line)
            with open(exp_dir / "log.txt", "a") as f:
                f.write(line + "\n")
    return log


def log_metrics(accelerator, exp_dir, record, term_names):
    """One metrics record to the console, exps/<exp>/metrics.jsonl and the trackers (main process only)."""
    if not accelerator.is_main_process:
        return
    terms = ", ".join(f"{name} {record[f'loss_{name}']:.4f}" for name in term_names)
    tqdm.write(f"step {record['step']}: loss {record['loss']:.4f} ({terms}) lr {record['lr']:.2e} "
               f"grad_norm {record['grad_norm']:.3f} {record['step_time']:.3f}s/step "
               f"(data wait {record['data_wait']:.3f}s) {record['images_per_sec']:.1f} img/s")
    with open(exp_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
