"""Export a checkpoint: `python -m omegadit.export {diffusers,onnx} CKPT OUT [options]` (from the repository root).

  python -m omegadit.export diffusers exps/run/checkpoints/0400000 exported/run    # a diffusers pipeline folder
  python -m omegadit.export onnx exps/run/checkpoints/0400000 exported/run.onnx   # the denoiser as ONNX

CKPT is anything generate.py --ckpt takes. Both write a model card (README.md) beside what they export.
"""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # models/, generate.py and json_label_dataset.py live at the repository root
    sys.path.insert(0, str(REPO_ROOT))


def add_checkpoint_flags(p):
    p.add_argument("ckpt", help="train.py checkpoint directory, .safetensors, or a .pt generate.py reads")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--ckpt-format", default=None, help="format of a checkpoint another project released")
    p.add_argument("--tokenizer", default=None, help="autoencoder spec overriding the checkpoint's")
    p.add_argument("--vae-ckpt", default=None, help="VA-VAE checkpoint path (overrides the config's ckpt_path)")
    p.add_argument("--latent-stats", default=None, help="latents_stats.pt of the training data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m omegadit.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)
    d = sub.add_parser("diffusers", help="a folder diffusers.DiffusionPipeline.from_pretrained loads")
    add_checkpoint_flags(d)
    d.add_argument("out_dir", help="output folder")
    d.add_argument("--text-encoder", default=None, help="text encoder id or directory overriding the checkpoint's")
    o = sub.add_parser("onnx", help="the denoiser (and a diffusers VAE decoder) as ONNX")
    add_checkpoint_flags(o)
    o.add_argument("out", help="output .onnx file of the denoiser")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with torch")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common = dict(use_ema=not args.no_ema, source_format=args.ckpt_format, autoencoder=args.tokenizer,
                  vae_ckpt=args.vae_ckpt, latent_stats=args.latent_stats)
    if args.format == "diffusers":
        from omegadit.export.diffusers_pipeline import export_diffusers
        export_diffusers(args.ckpt, args.out_dir, text_encoder=args.text_encoder, **common)
        print(f"wrote the diffusers pipeline {args.out_dir} (load it with OmegaDiTPipeline.from_pretrained, or "
              f"DiffusionPipeline.from_pretrained after `import omegadit.export.diffusers_pipeline`)")
    else:
        from omegadit.export.onnx import export_onnx
        written = export_onnx(args.ckpt, args.out, opset=args.opset, check=not args.no_check, **common)
        print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
