"""Model cards written by the exports: from the checkpoint description, args.json and metrics.jsonl."""
import json

import pytest
import torch

from models.sit import SiT
from omegadit import checkpoint
from omegadit.conditioners import TextConditioner
from omegadit.export.model_card import MARKER, model_card, write_model_card
from test_export_diffusers import small_random, write_checkpoint


@pytest.fixture
def run(tmp_path, minilm):
    """exps/card-run/ as train.py leaves it: args.json, metrics.jsonl and checkpoints/0000020/."""
    exp = tmp_path / "exps" / "card-run"
    model = small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4, num_heads=2,
                             text_dim=384, text_len=16, z_dims=[]))
    stats = (torch.zeros(48, 1, 1), torch.ones(48, 1, 1))
    ckpt = write_checkpoint(exp / "checkpoints" / "0000020", model, TextConditioner(minilm, 16), "pixel", stats)
    (exp / "args.json").write_text(json.dumps({
        "exp_name": "card-run", "model": "SiT-T/4", "data_dir": "/data/shapes", "use_json_dataset": True,
        "batch_size": 64, "learning_rate": 3e-4, "lr_schedule": "cosine", "max_train_steps": 40, "ema_decay": 0.999,
        "mixed_precision": "no", "enc_type": "none", "text_encoder": "minilm", "seed": 0}))
    (ckpt / "args.json").write_text((exp / "args.json").read_text())  # train.py keeps a copy in each checkpoint
    records = [{"step": 10, "loss": 0.9, "loss_denoise": 0.8, "lr": 3e-4}, {"step": 20, "fid": 123.4, "fid_samples": 64},
               {"step": 20, "loss": 0.5, "loss_denoise": 0.45, "lr": 2e-4}, {"step": 30, "loss": 0.1}]
    (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{truncated")
    return ckpt, model


def test_card_from_description_args_and_metrics(run):
    ckpt, model = run
    card = model_card(checkpoint.read_description(ckpt / "ema.safetensors"), ckpt, export="diffusers")
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n") and MARKER in card
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    for row in ("| hidden_size | 64 |", "| depth | 4 |", "| autoencoder | `pixel` |", "| caption tokens | 16 |",
                "| data folder | `/data/shapes` |", "| image size | 32 px |", "| checkpoint step | 20 |",
                "| learning rate | 0.0003 |", "| LR schedule | `cosine` |", "| global batch size | 64 |",
                "| fid (step 20) | 123.4 |", "| loss (step 20) | 0.5 |", "| cfg scale | 2 |"):
        assert row in card, row
    assert "(step 30)" not in card  # metrics after the checkpoint's step are not its metrics
    assert "time_shifting=True" in card and "DiffusionPipeline.from_pretrained" in card


def test_card_without_a_training_folder(run, tmp_path):
    ckpt, _ = run
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((ckpt / "ema.safetensors").read_bytes())
    card = model_card(checkpoint.read_description(alone), alone, export="onnx", files=["alone.onnx"])
    assert "library_name: onnx" in card and "Not recorded" in card and "None recorded" in card
    assert "`alone.onnx`" in card


def test_exports_write_the_card_and_keep_a_foreign_readme(run, tmp_path):
    from omegadit.export.__main__ import main as export_main

    ckpt, _ = run
    export_main(["diffusers", str(ckpt), str(tmp_path / "pipe")])
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert MARKER in card and "| checkpoint step | 20 |" in card and "| fid (step 20) | 123.4 |" in card
    foreign = tmp_path / "README.md"
    foreign.write_text("my notes\n")
    description = checkpoint.read_description(ckpt / "ema.safetensors")
    assert write_model_card(foreign, description, ckpt, "onnx", only_if_ours=True) is None
    assert foreign.read_text() == "my notes\n"
    ours = tmp_path / "sub" / "README.md"
    ours.parent.mkdir()
    ours.write_text(f"{MARKER}\nold card\n")
    assert write_model_card(ours, description, ckpt, "onnx", only_if_ours=True) == ours
    assert "old card" not in ours.read_text()
