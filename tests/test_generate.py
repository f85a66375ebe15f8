"""generate.py end to end on a tiny text model: PNGs, ADM npz, grid, resume, batch and process invariance."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from conftest import REPO_ROOT
from safetensors.torch import save_file

from models.sit import SiT, SiT_models
from test_sit import to_reference_layout


def small_random(model, seed=0, std=0.05):
    """Random weights small enough that samples stay inside the image range (so images differ between seeds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_legacy_weights(model, path):
    """Weights as train.py wrote them before checkpoints described themselves: the SiT config (with the caption
    dropout it then held) as the only metadata, args.json beside them."""
    config = {**model.config, "cfg_prob": 0.1}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps(config)})


def text_model():
    """A small SiT for the 32 px pixel-tokenizer latents (48 x 8 x 8) and 16 MiniLM caption tokens (384-d)."""
    return small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=384, depth=4, num_heads=6,
                            text_dim=384, text_len=16, z_dims=[]))


@pytest.fixture(scope="module")
def checkpoint(text_dataset, minilm, tmp_path_factory):
    """A checkpoint directory laid out as train.py wrote it before checkpoints described themselves."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "0000010"
    ckpt.mkdir()
    model = text_model()
    save_legacy_weights(model, ckpt / "model.safetensors")
    save_legacy_weights(model, ckpt / "ema.safetensors")
    (ckpt / "args.json").write_text(json.dumps(dict(tokenizer="pixel", data_dir=str(text_dataset),
                                                    clip_model_id=minilm, shift_base=4096, time_shifting=True)))
    return ckpt


def generate_argv(ckpt, prompts, out, name, *extra):
    return ["--ckpt", str(ckpt), "--prompts-file", str(prompts), "--sample-dir", str(out), "--name", name,
            "--mode", "ode", "--num-steps", "3", "--cfg-scale", "2.0", "--mixed-precision", "no", *extra]


def run_generate(argv):
    generate.main(generate.parse_args(argv))


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_writes_pngs_adm_npz_and_grid(checkpoint, text_dataset, tmp_path):
    prompts = text_dataset / "seen_prompts.txt"
    num_prompts = len(prompts.read_text().splitlines())
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "s", "--num-images-per-prompt", "2",
                               "--per-proc-batch-size", "3"))
    images = pngs(tmp_path / "s")
    assert len(images) == 2 * num_prompts
    with np.load(tmp_path / "s.npz") as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (2 * num_prompts, 32, 32, 3)
    for i, image in enumerate(images.values()):
        np.testing.assert_array_equal(arr[i], image)
    assert len({arr[i].tobytes() for i in range(len(arr))}) == len(arr)
    assert Image.open(tmp_path / "s_grid.png").size[0] > 32


def test_resume_fills_in_missing_images_identically(checkpoint, text_dataset, tmp_path):
    argv = generate_argv(checkpoint, text_dataset / "seen_prompts.txt", tmp_path, "r")
    run_generate(argv)
    first = pngs(tmp_path / "r")
    kept = tmp_path / "r" / "000000.png"
    kept_mtime = kept.stat().st_mtime_ns
    for name in ("000001.png", "000003.png"):
        (tmp_path / "r" / name).unlink()
    run_generate(argv)
    assert kept.stat().st_mtime_ns == kept_mtime
    second = pngs(tmp_path / "r")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_batch_size_and_seed(checkpoint, text_dataset, tmp_path):
    prompts = text_dataset / "seen_prompts.txt"
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "b1", "--per-proc-batch-size", "1"))
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "b8", "--per-proc-batch-size", "8"))
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "seed1", "--global-seed", "1"))
    b1, b8, seed1 = (pngs(tmp_path / n) for n in ("b1", "b8", "seed1"))
    for name in b1:
        assert np.abs(b1[name].astype(int) - b8[name].astype(int)).max() <= 1
        assert np.abs(b1[name].astype(int) - seed1[name].astype(int)).max() > 10


def test_two_processes_write_the_same_samples_as_one(checkpoint, text_dataset, tmp_path):
    prompts = text_dataset / "seen_prompts.txt"
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "tests/rank_probe.py", "generate", *generate_argv(checkpoint, prompts, tmp_path, "two")]
    probe = tmp_path / "probe"
    result = subprocess.run(command, cwd=REPO_ROOT, env={**env, "PROBE_DIR": str(probe)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert one.keys() == two.keys()
    written = [set((probe / f"rank{r}_images.txt").read_text().split()) for r in (0, 1)]
    assert written[0] and written[1] and not written[0] & written[1]  # the processes shared the work
    assert written[0] | written[1] == set(two)
    for name in one:
        assert np.abs(one[name].astype(int) - two[name].astype(int)).max() <= 1
    with np.load(tmp_path / "two.npz") as f:
        assert f["arr_0"].shape[0] == len(two)


def test_original_pt_checkpoint_with_explicit_decoding_flags(text_dataset, minilm, tmp_path):
    def reference_model(seed):
        model = SiT_models["SiT-S/4"](input_size=8, in_channels=48, text_dim=384, z_dims=[])
        return to_reference_layout(small_random(model, seed=seed))

    raw, ema = reference_model(0), reference_model(1)
    args = Namespace(model="SiT-S/4", projector_dim=2048)
    torch.save({"model": raw, "ema": ema, "args": args}, tmp_path / "0005000.pt")
    torch.save({"model": ema, "ema": ema, "args": args}, tmp_path / "ema_only.pt")
    (tmp_path / "prompts.txt").write_text("a red circle on the left\na small blue square at the top\n")
    decoding = ["--tokenizer", "pixel", "--latent-stats", str(text_dataset / "vae-in" / "latents_stats.pt"),
                "--text-encoder", minilm]
    for ckpt, name, extra in (("0005000.pt", "pt", []), ("0005000.pt", "raw", ["--no-ema"]),
                              ("ema_only.pt", "ema", [])):
        run_generate(generate_argv(tmp_path / ckpt, tmp_path / "prompts.txt", tmp_path, name, *decoding, *extra))
    with np.load(tmp_path / "pt.npz") as f, np.load(tmp_path / "raw.npz") as r, np.load(tmp_path / "ema.npz") as e:
        assert f["arr_0"].shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(f["arr_0"], e["arr_0"])  # the EMA weights by default
        assert not np.array_equal(f["arr_0"], r["arr_0"])  # --no-ema takes the raw ones


def test_class_model_balanced_labels(text_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4, num_heads=2,
                             num_classes=3, z_dims=[]))
    save_legacy_weights(model, ckpt / "ema.safetensors")
    (ckpt / "args.json").write_text(json.dumps(dict(tokenizer="pixel", data_dir=str(text_dataset))))
    run_generate(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path), "--name", "c", "--balanced-sampling",
                  "--num-fid-samples", "5", "--mode", "sde", "--num-steps", "3", "--mixed-precision", "no"])
    assert generate.conditions_for(Namespace(balanced_sampling=True, num_fid_samples=5, global_seed=0), model) == (
        [0, 1, 2, 0, 1], 5)
    with np.load(tmp_path / "c.npz") as f:
        assert f["arr_0"].shape == (5, 32, 32, 3)


def test_bad_inputs_fail_before_sampling(checkpoint, text_dataset, tmp_path):
    prompts = text_dataset / "seen_prompts.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        run_generate(generate_argv(checkpoint, tmp_path / "missing.txt", tmp_path, "x"))
    with pytest.raises(FileNotFoundError, match="latent statistics"):
        run_generate(generate_argv(checkpoint, prompts, tmp_path, "x", "--latent-stats", str(tmp_path / "no.pt")))
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    save_legacy_weights(small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4,
                                        num_heads=2, text_dim=32, z_dims=[])), narrow / "ema.safetensors")
    (narrow / "args.json").write_text((checkpoint / "args.json").read_text())
    with pytest.raises(ValueError, match="--text-encoder"):
        run_generate(generate_argv(narrow, prompts, tmp_path, "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        run_generate(generate_argv(empty, prompts, tmp_path, "x"))
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_fp8_samples_stay_close_to_bf16_and_are_recorded(checkpoint, text_dataset, tmp_path):
    prompts = text_dataset / "seen_prompts.txt"
    run_generate([*generate_argv(checkpoint, prompts, tmp_path, "bf16"), "--mixed-precision", "bf16"])
    run_generate([*generate_argv(checkpoint, prompts, tmp_path, "fp8"), "--mixed-precision", "bf16", "--fp8"])
    bf16, fp8 = pngs(tmp_path / "bf16"), pngs(tmp_path / "fp8")
    assert bf16.keys() == fp8.keys()
    differences = np.stack([np.abs(bf16[n].astype(int) - fp8[n].astype(int)) for n in bf16])
    assert differences.max() > 0 and differences.mean() < 3  # the matmuls really changed, the images hardly
    assert json.loads((tmp_path / "fp8" / "manifest.json").read_text())["fp8"] is True
    assert "fp8" not in json.loads((tmp_path / "bf16" / "manifest.json").read_text())


def test_fp8_needs_bf16(checkpoint, text_dataset, tmp_path):
    argv = generate_argv(checkpoint, text_dataset / "seen_prompts.txt", tmp_path, "x", "--fp8")
    with pytest.raises(SystemExit):
        generate.parse_args(argv)  # with --mixed-precision no
    with pytest.raises(ValueError, match="--mixed-precision bf16"):
        run_generate([*argv, "--mixed-precision", "auto"])  # auto is float32 on a CPU
    assert not (tmp_path / "x").exists()
