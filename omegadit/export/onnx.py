"""The denoiser (and the latent decoder) of a checkpoint as ONNX graphs with a dynamic batch axis.

    python -m omegadit.export onnx CKPT OUT.onnx

writes
  OUT.onnx               the denoiser: inputs `latents` (B, C, H, W) float32 normalised latents, `timestep` (B,)
                         float32 the backbone's network time (flow objectives: t in [0, 1], 1 = noise), and
                         `encoder_hidden_states` (B, L, D) float32 caption tokens (text models) or `class_labels`
                         (B,) int64 (class models); output `model_output` (B, C, H, W) float32 (the velocity dx/dt
                         for the flow objective)
  OUT.decoder.onnx       the latent decoder: `latents` (B, C, H, W) normalised latents -> `images` (B, 3, H', W')
                         float32 in about [-1, 1] (the latent statistics are inside: a diffusers AutoencoderKL
                         decoder, VA-VAE included, or the pixel tokenizer's depth-to-space)
  OUT.json               the names, shapes and types above, the null condition for classifier-free guidance, the
                         ODE time grid for the default number of steps and the checkpoint description
  README.md              the model card, beside OUT.onnx (unless a README.md not written by an export is there)

Weights larger than 1.5 GB go to OUT.onnx.data (ONNX external data, which must stay beside OUT.onnx).
`onnx` and `onnxscript` (torch's exporter) are needed to export, `onnxruntime` to check and run: they are optional
(requirements-dev.txt); export_onnx names what is missing. With check=True the export runs both graphs in
onnxruntime on the CPU for batch sizes 1 and 3 and compares them with torch (largest difference at most 1e-4).
"""
import json
import math
import warnings
from pathlib import Path

import torch

CHECK_BATCH_SIZES = (1, 3)
CHECK_TOLERANCE = 1e-4
EXTERNAL_DATA_BYTES = 1.5e9


def require(*modules):
    """Import the optional ONNX packages, or explain how to install them."""
    import importlib
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"ONNX export needs the optional package(s) {', '.join(missing)}: "
                                  f"pip install {' '.join(missing)}  (all listed in requirements-dev.txt)")
    return [importlib.import_module(m) for m in modules]


class Denoiser(torch.nn.Module):
    """(latents, timestep, condition) -> the backbone's prediction, without the aux outputs."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, latents, timestep, condition):
        return self.backbone(latents, timestep, condition)[0]


class Decoder(torch.nn.Module):
    """Normalised latents -> images in about [-1, 1]: (latents * std + mean) through the autoencoder's decoder."""

    def __init__(self, tokenizer, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.float().reshape(1, -1, 1, 1))
        self.vae = getattr(getattr(tokenizer, "vae", None), "autoencoder", None)
        self.patch_size = getattr(tokenizer, "patch_size", None)
        if self.vae is None and self.patch_size is None:
            raise ValueError(f"no ONNX decoder for the autoencoder {tokenizer.spec!r}")

    def forward(self, latents):
        raw = latents * self.std + self.mean
        if self.vae is not None:
            return self.vae.decode(raw).sample
        return torch.nn.functional.pixel_shuffle(raw, self.patch_size)


def condition_input(model, batch: int, generator=None):
    """(input name, example tensor, its description) of the model's condition."""
    if model.conditioning == "text":
        shape = (batch, model.config["text_len"], model.config["text_dim"])
        return "encoder_hidden_states", torch.randn(shape, generator=generator), ("float32", ["batch", *shape[1:]])
    labels = torch.randint(0, model.config["num_classes"], (batch,), generator=generator)
    return "class_labels", labels, ("int64", ["batch"])


def _export(module, args, path: Path, input_names, output_names, opset):
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in input_names}
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(module, args, None, input_names=list(input_names),
                                    output_names=list(output_names), opset_version=opset,
                                    dynamic_shapes=dict(zip(forward_arg_names(module), dynamic.values())),
                                    dynamo=True, verbose=False)
    program.save(str(path), external_data=size > EXTERNAL_DATA_BYTES)
    return path


def forward_arg_names(module):
    import inspect
    return [name for name in inspect.signature(module.forward).parameters]


def run_onnx(path, feeds: dict):
    """Outputs of an ONNX file in onnxruntime on the CPU."""
    (ort,) = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()})


def check_against_torch(path, module, make_feeds, tolerance=CHECK_TOLERANCE) -> dict:
    """{batch size: largest |onnxruntime - torch|} for CHECK_BATCH_SIZES; raises above `tolerance`."""
    errors = {}
    for batch in CHECK_BATCH_SIZES:
        feeds = make_feeds(batch)
        with torch.no_grad():
            expected = module(*feeds.values()).float().numpy()
        (got,) = run_onnx(path, feeds)
        if got.shape != expected.shape:
            raise RuntimeError(f"{path}: onnxruntime gave shape {got.shape} for batch {batch}, torch {expected.shape}")
        errors[batch] = float(abs(got - expected).max())
        if not errors[batch] <= tolerance:
            raise RuntimeError(f"{path}: onnxruntime differs from torch by {errors[batch]:.3g} at batch {batch} "
                               f"(tolerance {tolerance})")
    return errors


def export_onnx(ckpt, out, use_ema=True, source_format=None, autoencoder=None, vae_ckpt=None, latent_stats=None,
                opset=None, check=True, decoder=True) -> list:
    """Write OUT.onnx, OUT.decoder.onnx, OUT.json and the model card (see the module docstring); returns the paths
    written."""
    from models.tokenizers import load_tokenizer
    from omegadit import checkpoint
    from omegadit.export.diffusers_pipeline import export_description
    from omegadit.export.model_card import write_model_card

    require("onnx", "onnxscript")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"the output should be a .onnx file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = checkpoint.load(ckpt, use_ema=use_ema, source_format=source_format)
    description = export_description(loaded, autoencoder, latent_stats)
    model = loaded.model.float().eval()
    generator = torch.Generator().manual_seed(0)
    shape = tuple(model.latent_shape)
    condition_name, example, (condition_dtype, condition_shape) = condition_input(model, 2, generator)

    denoiser = Denoiser(model).eval()
    _export(denoiser, (torch.randn(2, *shape, generator=generator), torch.rand(2, generator=generator), example),
            out, ["latents", "timestep", condition_name], ["model_output"], opset)
    written = [out]
    report = {}
    if check:
        def denoiser_feeds(batch):
            g = torch.Generator().manual_seed(batch)
            return {"latents": torch.randn(batch, *shape, generator=g), "timestep": torch.rand(batch, generator=g),
                    condition_name: condition_input(model, batch, g)[1]}
        report["denoiser_max_abs_error"] = check_against_torch(out, denoiser, denoiser_feeds)

    decoder_info = None
    if decoder:
        stats = description["latent_stats"]
        tokenizer = load_tokenizer(description["autoencoder"], ckpt_path=vae_ckpt)
        latent_decoder = Decoder(tokenizer, torch.tensor(stats["mean"]), torch.tensor(stats["std"])).eval()
        decoder_path = out.with_suffix(".decoder.onnx")
        _export(latent_decoder, (torch.randn(2, *shape, generator=generator),), decoder_path, ["latents"],
                ["images"], opset)
        written.append(decoder_path)
        image_size = shape[-1] * tokenizer.downsample
        decoder_info = {"file": decoder_path.name, "autoencoder": description["autoencoder"],
                        "inputs": [io("latents", "float32", ["batch", *shape])],
                        "outputs": [io("images", "float32", ["batch", 3, image_size, image_size],
                                       "RGB in about [-1, 1]: uint8 = clip(round((x + 1) * 127.5), 0, 255)")]}
        if check:
            def decoder_feeds(batch):
                return {"latents": torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))}
            report["decoder_max_abs_error"] = check_against_torch(decoder_path, latent_decoder, decoder_feeds)

    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(interface(description, model, loaded.objective, out, condition_name,
                                            condition_dtype, condition_shape, decoder_info, report), indent=1))
    written.append(sidecar)
    card = write_model_card(out.parent / "README.md", description, ckpt, export="onnx", files=[p.name for p in written],
                            only_if_ours=True)
    if card is not None:
        written.append(card)
    return written


def io(name, dtype, shape, meaning=None):
    entry = {"name": name, "dtype": dtype, "shape": shape}
    if meaning:
        entry["meaning"] = meaning
    return entry


def interface(description, model, objective, out, condition_name, condition_dtype, condition_shape, decoder_info,
              report) -> dict:
    """What OUT.json records: enough to sample in another language (see README.md, "ONNX")."""
    sampling = description.get("sampling", {})
    num_steps = sampling.get("num_steps", 50)
    shape = list(model.latent_shape)
    null = model.null_condition(1, "cpu")[0]
    prediction = "velocity dx/dt" if objective.family == "flow" else f"the {objective.name} objective's prediction"
    times = (objective.sampling_times(num_steps, stochastic=False, shift_dim=math.prod(shape))
             if objective.family == "flow" else None)
    return {
        "denoiser": {
            "file": out.name,
            "inputs": [io("latents", "float32", ["batch", *shape], "normalised latents x_t"),
                       io("timestep", "float32", ["batch"], "network time (objective.network_time(t))"),
                       io(condition_name, condition_dtype, condition_shape,
                          "caption tokens of the text encoder" if condition_name == "encoder_hidden_states"
                          else "class index")],
            "outputs": [io("model_output", "float32", ["batch", *shape], prediction)],
        },
        "decoder": decoder_info,
        "conditioning": model.conditioning,
        "text_encoder": description["conditioner"]["config"].get("text_encoder"),
        "null_condition": null.tolist(),
        "sampling": {"defaults": sampling, "ode_num_steps": num_steps if times else None, "ode_times": times,
                     "ode_network_times": None if times is None else
                     objective.network_time(torch.tensor(times, dtype=torch.float64)).tolist()},
        "check": report,
        "description": description,
    }
