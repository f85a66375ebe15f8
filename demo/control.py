"""The ControlNet demo (presets control-cpu, control-gpu): shapes with their silhouettes as masks -> pixel latents ->
a text-to-image SiT (train.py) -> a ControlNet on the masks (train.py --control --init-from) -> samples of new masks
with their captions, at --controlnet-scale 1 and 0 (the mask ignored: the base model) -> scores.

Scores: how well the shapes follow the masks (evaluations/mask_iou.py: IoU of the shape's pixels with the mask) and
the caption alignment (evaluations/alignment.py: colour from the caption; shape, size and position from the mask,
which was drawn for the caption).
"""
import json
import time

from demo.run import StageError, duration, encode, generate, make_data, prepare_workdir, stage, train
from evaluations.alignment import format_table, load_samples, score
from evaluations.mask_iou import load_masks, score_masks

CONTROL_EXP = "shapes-control"
SCALES = {"control": 1.0, "no_control": 0.0}
STAGES = 6


def train_control(s, work, base):
    """The ControlNet branch on the frozen base checkpoint; returns its checkpoint directory."""
    return train(s, work, CONTROL_EXP, s["control_steps"], s["control_learning_rate"],
                 ("--control", "--init-from", base))


def sample(s, work, base, controlnet):
    """The control_eval masks with their captions, with the ControlNet at scale 1 and at 0; {group: npz}."""
    data, outputs = work / "data" / "control_eval", {}
    for group, scale in SCALES.items():
        generate(s, work, base, group, ["--controlnet", controlnet, "--controlnet-scale", scale,
                                        "--mask-folder", data / "masks", "--prompts-file", data / "prompts.txt",
                                        "--num-images-per-prompt", s["images_per_prompt"]])
        outputs[group] = work / "samples" / f"{group}.npz"
    return outputs


def evaluate(s, work, outputs):
    """Mask IoU of both groups, caption alignment of the controlled samples."""
    data = work / "data" / "control_eval"
    masks = load_masks(data / "masks")
    scores = {}
    for group, npz in outputs.items():
        images, prompts = load_samples(npz, data / "prompts.txt", s["images_per_prompt"])
        scores[group] = {"mask_iou": score_masks(images, masks, s["images_per_prompt"]),
                         "caption_alignment": score(images, prompts)}
    return scores


def main(s, work, overwrite, started):
    print(f"ControlNet demo: base {s['model']} ({s['steps']} steps), then its ControlNet ({s['control_steps']} "
          f"steps) on the shapes' silhouettes", flush=True)
    try:
        prepare_workdir(work, overwrite)
        durations = {}
        _, durations["data"] = stage(1, "shapes dataset with masks", make_data, s, work, total=STAGES)
        _, durations["encode"] = stage(2, "pixel latents", encode, s, work, total=STAGES)
        base, durations["train"] = stage(3, "training the base model", train, s, work, total=STAGES)
        controlnet, durations["train_control"] = stage(4, "training the ControlNet", train_control, s, work, base,
                                                       total=STAGES)
        outputs, durations["sample"] = stage(5, "sampling new masks (scale 1 and 0)", sample, s, work, base,
                                             controlnet, total=STAGES)
        scores, durations["score"] = stage(6, "scoring", evaluate, s, work, outputs, total=STAGES)
    except StageError as err:
        raise SystemExit(f"demo stopped: {err}")
    wall = time.perf_counter() - started
    grids = {group: str(work / "samples" / f"{group}_compare_grid.png") for group in outputs}
    results = dict(settings=s, scores=scores, checkpoint=str(base), controlnet=str(controlnet), grids=grids,
                   samples={group: str(npz) for group, npz in outputs.items()}, stage_seconds=durations,
                   wall_seconds=wall)
    (work / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    for group in outputs:
        iou = scores[group]["mask_iou"]
        print(f"\n{group} (--controlnet-scale {SCALES[group]}): mask IoU mean {iou['iou_mean']:.3f}, median "
              f"{iou['iou_median']:.3f}, IoU >= 0.8 for {iou['iou_at_least_0.8']:.0%} of {iou['n']} samples")
        print(format_table(scores[group]["caption_alignment"]))
        print(f"mask | sample grid: {grids[group]}")
    print(f"results: {work / 'demo_results.json'}")
    print(f"wall time: {wall:.1f}s = {duration(wall)} ({', '.join(f'{k} {v:.1f}s' for k, v in durations.items())})")
    return results

