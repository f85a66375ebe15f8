"""Exports of a checkpoint for use outside this repository: `python -m omegadit.export --help`.

- `diffusers` (omegadit/export/diffusers_pipeline.py): a folder that `diffusers.DiffusionPipeline.from_pretrained`
  loads as an `OmegaDiTPipeline` (transformer, scheduler, VAE, text encoder and tokenizer as diffusers and
  transformers components), with a model card.
- `onnx` (omegadit/export/onnx.py): the denoiser (and a diffusers AutoencoderKL decoder) as ONNX graphs with a
  dynamic batch axis, with a JSON sidecar naming inputs and outputs, and a model card.
- the model card (omegadit/export/model_card.py): README.md from the checkpoint description and args.json.
"""
