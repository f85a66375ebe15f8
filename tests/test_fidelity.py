"""Differences from the original OmegaDiT (README.md, "Differences from the original OmegaDiT"): those fixed in the
model and the trainer (q/k/v initialisation, the mask token on steps without path drop, the EMA warm-up), the
original recipe (cosine learning rate, no clipping, no EMA, seed 23) and the VA-VAE posterior sample."""
import json
import math
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import generate
import train
from conftest import REPO_ROOT, fixture_path
from models.sit import SiT_models
from test_sit import inputs, tiny_text_sit
from utils import ema_decay_at, lr_lambda


def test_qkv_initialised_as_three_separate_xavier_layers():
    model = SiT_models["SiT-T/2"](input_size=8, in_channels=4, text_dim=16, text_len=3, z_dims=[])
    dim = model.config["hidden_size"]
    for block in model.blocks:
        for projection in block.attn.qkv.weight.chunk(3, dim=0):
            bound = math.sqrt(6 / (dim + dim))  # xavier_uniform of a (dim, dim) layer
            assert projection.abs().max() <= bound
            assert abs(projection.std().item() / (bound / math.sqrt(3)) - 1) < 0.03


def adam_steps(model, optimizer, num_steps):
    x, t, y = inputs(model, batch=2)
    for _ in range(num_steps):
        out, _ = model(x, t, y)
        out.square().mean().backward()
        for parameter in model.take_unused_parameters():
            parameter.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_mask_token_untouched_by_steps_without_path_drop():
    model = tiny_text_sit(path_drop_prob=1.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.mask_token.detach().clone()
    adam_steps(model, optimizer, 1)
    after_drop = model.mask_token.detach().clone()
    assert not torch.equal(before, after_drop)  # used, so trained
    model.path_drop_prob = 0.0
    adam_steps(model, optimizer, 3)
    assert torch.equal(model.mask_token, after_drop)  # Adam's momentum alone must not move it
    model.sprint_drop_ratio = 0.5  # SPRINT token drop pads with the mask token: it is used again
    adam_steps(model, optimizer, 1)
    assert not torch.equal(model.mask_token, after_drop)


def test_ema_warmup_decay():
    assert ema_decay_at(0, 0.9999, warmup=True) == 0.1
    assert ema_decay_at(90, 0.9999, warmup=True) == 0.91
    assert ema_decay_at(10 ** 7, 0.9999, warmup=True) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999


def test_split_point_path_drop_equals_per_sample_mask():
    """Guidance with path drop calls the SiT with uncond=k: the same outputs as the per-sample mask, while the
    sparse blocks run on the conditional samples only."""
    model = tiny_text_sit(path_drop_prob=0.0).eval()
    x, t, y = inputs(model, batch=4)
    mask = torch.tensor([False, False, True, True])
    calls = []
    hook = model.blocks[2].register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        split, _ = model(x, t, y, uncond=2)
        assert calls == [2]
        per_sample, _ = model(x, t, y, uncond=mask)
    hook.remove()
    torch.testing.assert_close(split, per_sample, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The original recipe (--recipe original, configs/original.yaml) and the VA-VAE posterior (README's table, 1-3, 7)
# ------------------------------------------------------------------------------------------------------------------

REQUIRED = ["--exp-name", "x", "--data-dir", "d"]


def test_original_recipe_lr_decays_by_cosine_from_1x_to_01x_every_step():
    args = train.parse_args(["--recipe", "original", *REQUIRED, "--max-train-steps", "1000"])
    assert (args.lr_schedule, args.lr_warmup_steps, args.seed) == ("cosine", 0, 23)
    multiplier = lr_lambda(args.lr_schedule, args.lr_warmup_steps, args.max_train_steps)
    values = [multiplier(step) for step in range(args.max_train_steps + 1)]
    assert values[0] == 1.0  # the first step at the full rate: no warm-up
    assert values[-1] == pytest.approx(0.1, abs=1e-12)  # 0.1x after the last step
    assert values[500] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(values, values[1:]))  # lower at every step
    ours = train.parse_args(REQUIRED)
    assert lr_lambda(ours.lr_schedule, ours.lr_warmup_steps, 1000)(999) == 1.0


def unclipped_update(recipe_argv):
    """(gradients, weights before, weights after) of one train.optimizer_step (SGD, lr 1) for gradients of norm
    far above 1."""
    from accelerate import Accelerator

    args = train.parse_args([*recipe_argv, *REQUIRED])
    model = tiny_text_sit()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x, t, y = inputs(model, batch=2)
    (model(x, t, y)[0].square().sum() * 1e4).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = None if not args.ema else deepcopy(model)
    train.optimizer_step(Accelerator(cpu=True), model, ema, optimizer, scheduler, args, 0)
    return grads, before, {n: p.detach() for n, p in model.named_parameters()}


def test_original_recipe_clips_no_gradient(fresh_accelerate_state):
    grads, before, after = unclipped_update(["--recipe", "original"])
    assert torch.cat([g.flatten() for g in grads.values()]).norm() > 100
    moved = [n for n in grads if not torch.equal(after[n], before[n])]
    assert len(moved) > len(grads) // 2
    assert all(torch.equal(after[n], before[n] - grads[n]) for n in moved)  # the whole gradient, as computed


def test_our_recipe_clips_at_one(fresh_accelerate_state):
    grads, before, after = unclipped_update([])
    change = torch.cat([(after[n] - before[n]).flatten() for n in grads])
    assert change.norm().item() == pytest.approx(1.0, rel=1e-3)


def test_original_recipe_keeps_no_ema_and_generate_samples_the_raw_weights(text_dataset, minilm, tmp_path,
                                                                            fresh_accelerate_state, capsys):
    from test_train import run_training, train_argv

    run_training(train_argv(text_dataset, tmp_path, minilm, "--recipe", "original", "--max-train-steps", "4",
                            "--checkpointing-steps", "4", "--sample-every", "4", "--num-samples", "2",
                            "--sample-steps", "2"))
    exp = tmp_path / "run"
    ckpt = exp / "checkpoints" / "0000004"
    assert not (ckpt / "ema.safetensors").exists() and (ckpt / "model.safetensors").exists()
    assert (exp / "samples" / "0000004.png").exists()  # the grid of the raw weights
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # train_argv's 1e-3, decayed to 0.1x at the end
    assert records[0]["lr"] == pytest.approx(1e-3 * lr_lambda("cosine", 0, 4)(1))
    assert json.loads((ckpt / "args.json").read_text())["seed"] == 23

    prompts = text_dataset / "seen_prompts.txt"
    common = ["--ckpt", str(ckpt), "--prompts-file", str(prompts), "--sample-dir", str(tmp_path / "s"),
              "--num-fid-samples", "2", "--num-steps", "2", "--mixed-precision", "no"]
    capsys.readouterr()
    generate.main(generate.parse_args([*common, "--name", "default"]))
    assert "holds no EMA weights (trained without EMA): sampling its raw weights" in capsys.readouterr().out
    generate.main(generate.parse_args([*common, "--name", "raw", "--no-ema"]))
    with np.load(tmp_path / "s" / "default.npz") as a, np.load(tmp_path / "s" / "raw.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_our_recipe_file_states_the_built_in_defaults():
    original = yaml.safe_load((REPO_ROOT / "configs" / "original.yaml").read_text())
    ours = yaml.safe_load((REPO_ROOT / "configs" / "omegadit.yaml").read_text())
    assert original.keys() == ours.keys() == {"train", "generate"}
    for script, parse, argv in (("train", train.parse_args, REQUIRED), ("generate", generate.parse_args,
                                                                        ["--ckpt", "c"])):
        assert original[script].keys() == ours[script].keys()
        defaults, stated = vars(parse(argv)), vars(parse([*argv, "--recipe", "omegadit"]))
        for key, value in ours[script].items():
            dest = key.replace("-", "_")
            assert defaults[dest] == value == stated[dest], (script, key)
        recipe = vars(parse([*argv, "--recipe", "original"]))
        assert all(recipe[k.replace("-", "_")] == v for k, v in original[script].items())
    # flags given on the command line win over the recipe
    assert train.parse_args(["--recipe", "original", "--ema", "--max-grad-norm", "2", *REQUIRED]).ema is True
    # the values a recipe states count as set by the user, as flags do (train.py passes the options a user set to
    # the parts that take them, and leaves the others to their defaults), even where they equal the built-in ones
    stated = {key.replace("-", "_") for key in ours["train"]}
    assert stated <= set(train.parse_args([*REQUIRED, "--recipe", "omegadit"]).explicit)
    assert not stated & set(train.parse_args(REQUIRED).explicit)


def test_recipe_is_chosen_on_the_command_line_only(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: original\nmax-grad-norm: 2\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config), *REQUIRED])
    config.write_text("max-grad-norm: 2\n")  # a config file overrides the recipe, the command line both
    args = train.parse_args(["--recipe", "original", "--config", str(config), *REQUIRED])
    assert (args.max_grad_norm, args.ema) == (2, False)


def vavae_config(tmp_path):
    meta = json.loads(safe_open(str(fixture_path("vavae.safetensors")), "pt").metadata()["json"])
    config = tmp_path / "vavae.yaml"
    config.write_text(yaml.safe_dump({"ckpt_path": str(fixture_path("vavae_checkpoint.pt")), "model": {"params": {
        "embed_dim": meta["embed_dim"], "ddconfig": meta["ddconfig"]}}}))
    return config


def encode_vavae(config, source, dest, *extra):
    """The original README's encode-vavae command line (paths changed; --gpus 0: on the CPU) with `extra`."""
    from preprocessing.dataset_tools import main
    assert main(["encode-vavae", f"--config={config}", f"--source={source}", f"--dest={dest}", "--gpus=0",
                 "--batch-size=100", "--workers", "0", *extra]) == 0
    return {p.relative_to(dest).as_posix(): np.load(p) for p in sorted(Path(dest).rglob("*.npy"))}


def test_vavae_latents_are_reproducible_posterior_samples_by_default(tmp_path):
    from models.tokenizers import load_tokenizer, posterior_noise, to_float
    from test_dataset_tools import make_images

    config = vavae_config(tmp_path)
    names = make_images(tmp_path / "images", n=3)
    sample = encode_vavae(config, tmp_path / "images", tmp_path / "sample")
    again = encode_vavae(config, tmp_path / "images", tmp_path / "again")
    one_by_one = encode_vavae(config, tmp_path / "images", tmp_path / "one_by_one", "--batch-size=1")
    mean = encode_vavae(config, tmp_path / "images", tmp_path / "mean", "--posterior", "mean")
    seed1 = encode_vavae(config, tmp_path / "images", tmp_path / "seed1", "--posterior-seed", "1")
    assert json.loads((tmp_path / "sample" / "encoding.json").read_text())["posterior"] == "sample"
    tok = load_tokenizer(f"vavae:{config}")
    assert sample.keys() == {n[:-4] + ".npy" for n in names}
    images = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "images" / n))).permute(2, 0, 1)
                          for n in names])
    previous = tok.encode(images)  # what encode-vavae stored before --posterior: the mean, in one batch
    mu, logvar = tok.vae.encode_posterior(to_float(images))
    expected = mu + torch.exp(0.5 * logvar) * posterior_noise([n[:-4] for n in names], mu.shape[1:], 0)
    for i, name in enumerate(names):
        key = name[:-4] + ".npy"
        np.testing.assert_array_equal(mean[key], previous[i].numpy())  # --posterior mean: the previous latents
        # a sample: mean + std * noise, the noise seeded by the image id and the seed
        torch.testing.assert_close(torch.from_numpy(sample[key]), expected[i], atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(sample[key], again[key])
        np.testing.assert_allclose(sample[key], one_by_one[key], atol=1e-5, rtol=0)  # the same noise per image
        assert np.abs(sample[key] - mean[key]).mean() > 1e-3
        assert not np.array_equal(sample[key], seed1[key])
    assert not np.array_equal(sample[names[0][:-4] + ".npy"] - mean[names[0][:-4] + ".npy"],
                              sample[names[1][:-4] + ".npy"] - mean[names[1][:-4] + ".npy"])


def test_one_latent_folder_never_mixes_means_and_samples(tmp_path, capsys):
    from preprocessing.dataset_tools import main
    from test_dataset_tools import make_images

    config = vavae_config(tmp_path)
    make_images(tmp_path / "images", n=2)
    encode_vavae(config, tmp_path / "images", tmp_path / "vae-in")
    argv = ["encode-vavae", "--config", str(config), "--source", str(tmp_path / "images"), "--dest",
            str(tmp_path / "vae-in"), "--gpus", "0", "--workers", "0"]
    assert main([*argv, "--posterior", "mean"]) == 2
    assert "holds latents encoded with" in capsys.readouterr().err
    assert main(["encode-vavae", "--tokenizer", "pixel", "--posterior", "sample", *argv[3:]]) == 2
    assert "has no posterior" in capsys.readouterr().err
