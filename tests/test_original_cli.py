"""The original OmegaDiT's command lines on our scripts (omegadit/compat.py): its train.sh (both versions), the
generate.py and evaluator.py lines of its eval.sh, with only the paths changed. Every flag is accepted; a flag that
means nothing here prints one line; one that contradicts the data or the checkpoint stops the run before any work.
Where a line is run for real, flags that size the run for a CPU test are appended after it (argparse keeps the last
value) and named in the test."""
import shlex
from argparse import Namespace

import numpy as np
import pytest
import torch

import generate
import train
from evaluations import evaluator
from models.sit import SiT_models
from test_evaluator import images, random_inception
from test_generate import small_random
from test_sit import to_reference_layout

# The original train.sh, text-to-image version (seed 23, resuming at step 60000), and the version before it.
TRAIN_SH = ('--use-json-dataset --report-to="wandb" --allow-tf32 --mixed-precision="bf16" --seed=23 '
            '--path-type="linear" --prediction="v" --weighting="uniform" --model="SiT-B/1" --enc-type="dinov2-vit-b" '
            '--proj-coeff=0.5 --output-dir="{out}" --exp-name="b1-reg" --batch-size=256 --data-dir="{data}" '
            '--cls=0.03 --cfm-weighting="uniform" --cfm-coeff=0.05 --resume-step=0060000')
TRAIN_SH_BEFORE = ('--report-to="wandb" --allow-tf32 --mixed-precision="bf16" --seed=0 --path-type="linear" '
                   '--prediction="v" --weighting="uniform" --model="SiT-B/1" --enc-type="dinov2-vit-b" '
                   '--proj-coeff=0.5 --output-dir="{out}" '
                   '--exp-name="b1-reg-invae-sprint-rms-rope-qknorm-valres-cfm-timeshifting" --batch-size=256 '
                   '--data-dir="{data}" --cls=0.03 --qk-norm --cfm-weighting="uniform" --cfm-coeff=0.05')
# The original eval.sh: generate.py under `python -m torch.distributed.launch` (which adds --local-rank=0), then
# evaluator.py.
GENERATE = ('--local-rank=0 --model SiT-B/1 --num-fid-samples 50000 --ckpt {ckpt} --path-type=linear '
            '--projector-embed-dims=768 --per-proc-batch-size=64 --mode=sde --num-steps=250 --cfg-scale=2.5 '
            '--cls-cfg-scale=2.5 --guidance-high=0.85 --sample-dir {out} --cls=768 --qk-norm')
EVALUATOR = ('--ref_batch {ref} --sample_batch {sample} --save_path {out} --cfg_cond 1 --step 0400000 '
             '--num_steps 250 --cfg 2.5 --cls_cfg 2.5 --gh 0.85')


def line(template, **paths):
    return shlex.split(template.format(**{k: str(v) for k, v in paths.items()}))


def notes(output, flag):
    return [text for text in output.splitlines() if text.startswith(f"{flag} (a flag of the original OmegaDiT)")]


def test_both_original_train_sh_lines_parse(tmp_path, capsys):
    args = train.parse_args(line(TRAIN_SH, out=tmp_path, data=tmp_path))
    assert (args.model, args.seed, args.resume_step, args.batch_size, args.weighting) == ("SiT-B/1", 23, 60000, 256,
                                                                                          "uniform")
    assert (args.report_to, args.mixed_precision, args.allow_tf32, args.cfm_coeff) == ("wandb", "bf16", True, 0.05)
    out = capsys.readouterr().out
    assert len(notes(out, "--cls")) == 1 and "add --recipe original" in out
    args = train.parse_args(line(TRAIN_SH_BEFORE, out=tmp_path, data=tmp_path))
    assert args.qk_norm and args.seed == 0
    out = capsys.readouterr().out
    assert "the original train.py accepted it but never applied it" in out  # --qk-norm means more here


def test_every_flag_of_the_original_train_py_is_accepted(tmp_path, capsys):
    # The flags of the original train.py that ours has under another name or not at all, each with a value.
    extra = ["--logging-dir", "logs", "--sampling-steps", "2000", "--num-sample-steps", "50", "--fused-attn",
             "--ops-head", "16", "--resolution", "256", "--vae-name", "REPA-E/e2e-invae", "--epochs", "1400",
             "--prediction", "v", "--cls", "0.03", "--cls-cfg-scale", "1.0", "--guidance-low", "0.0",
             "--guidance-high", "1.0", "--cfg-scale", "4.0", "--label-file", "x.json", "--clip-model-id", "m",
             "--cfg-prob", "0.1", "--shift-base", "4096", "--no-time-shifting", "--gradient-accumulation-steps", "1",
             "--adam-weight-decay", "0", "--max-grad-norm", "1.0", "--num-workers", "4", "--checkpointing-steps",
             "10000", "--max-train-steps", "400000", "--num-classes", "1000", "--no-qk-norm", "--no-fused-attn"]
    args = train.parse_args(["--exp-name", "x", "--data-dir", "d", *extra])
    assert (args.sample_every, args.sample_steps, args.text_encoder) == (2000, 50, "m")
    out = capsys.readouterr().out
    for flag in ("--logging-dir", "--fused-attn", "--ops-head", "--vae-name", "--epochs", "--cls", "--cls-cfg-scale"):
        assert len(notes(out, flag)) == 1, flag
    assert not notes(out, "--prediction") and not notes(out, "--resolution")  # hold / checked against the data
    with pytest.raises(SystemExit):  # the two spellings of one setting must agree
        train.parse_args(["--exp-name", "x", "--data-dir", "d", "--sampling-steps", "5", "--sample-every", "7"])


def test_original_train_sh_runs(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    # Appended for a CPU test: a fresh run instead of its resumption at step 60000, a small model and batch, two
    # steps, the offline text encoder and pixel latents (no CLIP, DINOv2 or VA-VAE weights here), no wandb;
    # --resolution 32 is checked against the 32 px images. With --recipe original, as our train.sh runs it.
    sized = ["--resume-step", "0", "--model", "SiT-S/4", "--batch-size", "4", "--max-train-steps", "2",
             "--checkpointing-steps", "2", "--enc-type", "none", "--clip-model-id", minilm, "--tokenizer", "pixel",
             "--report-to", "none", "--mixed-precision", "no", "--num-workers", "0", "--resolution", "32"]
    train.main(train.parse_args(line(TRAIN_SH, out=tmp_path, data=text_dataset) + sized + ["--recipe", "original"]))
    checkpoint = tmp_path / "b1-reg" / "checkpoints" / "0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "args.json", "model.safetensors", "rng_state_0.pt", "training_state.pt"]  # no EMA under the original recipe


def test_resolution_that_contradicts_the_data_stops_before_training(text_dataset, minilm, tmp_path,
                                                                      fresh_accelerate_state):
    argv = line(TRAIN_SH, out=tmp_path, data=text_dataset) + [
        "--resume-step", "0", "--model", "SiT-S/4", "--batch-size", "4", "--enc-type", "none", "--clip-model-id",
        minilm, "--tokenizer", "pixel", "--report-to", "none", "--mixed-precision", "no", "--resolution", "512"]
    with pytest.raises(ValueError, match=r"--resolution 512 but the images of .* are 32x32"):
        train.main(train.parse_args(argv))
    assert not (tmp_path / "b1-reg" / "checkpoints").exists()


@pytest.fixture
def original_checkpoint(tmp_path):
    """A checkpoint of the original train.py ({'model', 'opt', 'args', 'steps'}, no EMA) of a small SiT with REPA
    projectors for DINOv2-B (768), 77 caption tokens of the offline MiniLM (384-d) and 32 px pixel latents."""
    model = small_random(SiT_models["SiT-S/4"](input_size=8, in_channels=48, text_dim=384, z_dims=[768],
                                               projector_dim=64))
    path = tmp_path / "b1-reg" / "checkpoints" / "0400000.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": to_reference_layout(model), "opt": {}, "steps": 400000,
                "args": Namespace(model="SiT-S/4", projector_dim=64, path_type="linear")}, path)
    return path


def test_original_generate_line_runs(original_checkpoint, text_dataset, minilm, tmp_path, capsys):
    out = tmp_path / "b1-reg" / "checkpoints"
    # Appended for a CPU test: the small model's name, 3 steps and 2 images; the offline text encoder, the pixel
    # latents and their statistics (through the original's own --latent-stats-dir). No prompt flag: the original's
    # generate.py sampled its built-in prompts, and so does ours.
    sized = ["--model", "SiT-S/4", "--num-steps", "3", "--num-fid-samples", "2", "--per-proc-batch-size", "2",
             "--text-encoder", minilm, "--tokenizer", "pixel", "--latent-stats-dir", str(text_dataset / "vae-in"),
             "--mixed-precision", "no", "--name", "original"]
    args = generate.parse_args(line(GENERATE, ckpt=original_checkpoint, out=out) + sized)
    assert (args.cfg_scale, args.guidance_high, args.mode, args.num_fid_samples) == (2.5, 0.85, "sde", 2)
    generate.main(args)
    printed = capsys.readouterr().out
    for flag in ("--cls-cfg-scale", "--cls", "--qk-norm"):
        assert len(notes(printed, flag)) == 1, flag
    assert "holds no EMA weights" in printed and "original OmegaDiT's evaluation prompts" in printed
    with np.load(out / "original.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)


def test_original_generate_line_refuses_a_checkpoint_it_does_not_describe(original_checkpoint, text_dataset,
                                                                          minilm, tmp_path):
    out = tmp_path / "samples"
    decoding = ["--text-encoder", minilm, "--tokenizer", "pixel", "--latent-stats-dir", str(text_dataset / "vae-in"),
                "--name", "x"]
    with pytest.raises(ValueError, match=r"--model SiT-B/1: .* holds a SiT-S/4"):  # unchanged: SiT-B/1
        generate.main(generate.parse_args(line(GENERATE, ckpt=original_checkpoint, out=out) + decoding))
    for wrong, message in ((["--projector-embed-dims", "1024"], "REPA projectors for \\[768\\]"),
                           (["--resolution", "256"], "makes 32x32 images"),
                           (["--path-type", "cosine"], "trained on the linear path")):
        with pytest.raises(ValueError, match=message):
            generate.main(generate.parse_args(line(GENERATE, ckpt=original_checkpoint, out=out) + decoding +
                                              ["--model", "SiT-S/4", *wrong]))
    assert not (out / "x").exists() or not any((out / "x").iterdir())


def test_original_evaluator_line_writes_its_metrics_file(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", images(6, 6, 32, 32))
    np.savez(tmp_path / "sample.npz", images(7, 5, 32, 32))
    weights = tmp_path / "inception.pth"
    torch.save(random_inception().state_dict(), weights)
    save_path = tmp_path / "checkpoints"
    # Appended: random Inception weights (the real ones cannot be downloaded here), the CPU, small batches.
    evaluator.main(line(EVALUATOR, ref=tmp_path / "ref.npz", sample=tmp_path / "sample.npz", out=save_path) +
                   ["--inception-weights", str(weights), "--device", "cpu", "--batch-size", "4",
                    "--is-split-size", "2"])
    printed = capsys.readouterr().out
    written = tmp_path / "checkpoints2504000002.50.852.5cfg_cond_true.txt"  # the original's name for it
    assert save_path.is_dir() and written.is_file()
    lines = written.read_text().splitlines()
    assert [text.split(":")[0] for text in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert f"FID: {lines[1].split(': ')[1]}" in printed
    with pytest.raises(SystemExit):  # a batch given both ways
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--ref_batch", "x.npz"])
