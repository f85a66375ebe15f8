"""An OmegaDiT checkpoint as a diffusers pipeline folder, and the pipeline class that runs it.

    python -m omegadit.export diffusers CKPT OUT_DIR

writes OUT_DIR as `DiffusionPipeline.save_pretrained` lays a pipeline out:

    model_index.json      _class_name OmegaDiTPipeline and the library/class of each component
    transformer/          OmegaDiTTransformer: a diffusers ModelMixin/ConfigMixin around our backbone; its config is
                          {"description": the checkpoint description (omegadit/checkpoint.py)}
    scheduler/            FlowMatchEulerDiscreteScheduler (flow objectives whose ODE grid is an SD3-shifted linspace)
    vae/                  diffusers AutoencoderKL (VA-VAE or a diffusers VAE); absent for the pixel tokenizer
    text_encoder/, tokenizer/   the transformers caption encoder and its tokenizer (text models)
    README.md             the model card (omegadit/export/model_card.py)

Loading runs no code from the folder. Importing this module registers `OmegaDiTPipeline` and
`OmegaDiTTransformer` with diffusers, so that, from the repository root (or with it on PYTHONPATH):

    import omegadit.export.diffusers_pipeline          # registers the classes
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(OUT_DIR)  # an OmegaDiTPipeline; or OmegaDiTPipeline.from_pretrained
    image = pipe("a red circle", num_inference_steps=50, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0)).images[0]

Neither `custom_pipeline=` nor `trust_remote_code=True` is needed or used.

Sampling: by default the scheduler runs Euler on the probability-flow ODE over the objective's own time grid: the
pipeline hands the scheduler the unshifted grid linspace(1, 0, N + 1) (without the final 0) as `sigmas`, and the
scheduler's `shift` (set at export to the objective's resolution shift) maps it onto exactly the times
`generate.py --mode ode` uses (float32 rounding aside). The diffusers default grid (`set_timesteps(N)`, from
sigma 1 to a shifted 1/1000) differs from ours, so the pipeline never uses it. `sampler="euler" | "heun" | "sde"`
(any sampler of omegadit.sampling) instead runs our own sampler inside the pipeline, bit for bit generate.py's.
With `seed=s` (or one generator per image seeded s * 1_000_003 + index), the noise is generate.py's for
`--global-seed s`.
"""
import math
from typing import List, Optional, Union

import numpy as np
import torch
import diffusers
from diffusers import ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from models import rebuild_backbone
from models.tokenizers import to_uint8
from omegadit.objectives import build_objective

logger = logging.get_logger(__name__)

SEED_STRIDE = 1_000_003  # generate.py seeds image i of --global-seed s with s * 1_000_003 + i
SCHEDULER_TRAIN_TIMESTEPS = 1000


# ------------------------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------------------------

class OmegaDiTTransformer(ModelMixin, ConfigMixin):
    """Our backbone as a diffusers model. Config: {"description": the checkpoint description}; the weights are the
    backbone's, under `backbone.`.

    forward(hidden_states (N, C, H, W) normalised latents, timestep (N,) the backbone's network time (for flow
    objectives t in [0, 1], 1 = noise), encoder_hidden_states (N, L, D) caption tokens or class_labels (N,))
    returns the backbone's prediction (the velocity for flow objectives).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, description: dict):
        super().__init__()
        backbone = description["backbone"]
        self.backbone = rebuild_backbone(backbone["architecture"], backbone["config"])
        self.backbone.eval()

    @property
    def description(self) -> dict:
        return self.config.description

    def objective(self):
        """The training objective the description names (time grid, network time, velocity conversion)."""
        objective = self.description["objective"]
        return build_objective(objective["name"], **objective["config"])

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.backbone.latent_shape)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True):
        y = encoder_hidden_states if encoder_hidden_states is not None else class_labels
        if y is None:
            raise ValueError("OmegaDiTTransformer needs encoder_hidden_states (text models) or class_labels")
        timestep = torch.as_tensor(timestep, device=hidden_states.device, dtype=hidden_states.dtype)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        sample = self.backbone(hidden_states, timestep, y)[0]
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=sample)


def sd3_shift_of(objective, shift_dim: int, num_steps: int = 16) -> Optional[float]:
    """The factor s for which the objective's ODE grid is the SD3 shift s t / (1 + (s - 1) t) of linspace(1, 0),
    i.e. what FlowMatchEulerDiscreteScheduler(shift=s) does to the sigmas it is given; None when the grid is of
    another form (then the pipeline samples with our own Euler sampler)."""
    if getattr(objective, "family", None) != "flow":
        return None
    base = np.linspace(1.0, 0.0, num_steps + 1)
    grid = np.asarray(objective.sampling_times(num_steps, stochastic=False, shift_dim=shift_dim))
    middle = num_steps // 2
    t, shifted = base[middle], grid[middle]
    if not 0 < shifted < 1:
        return None
    shift = shifted * (1 - t) / (t * (1 - shifted))
    if not np.allclose(shift * base / (1 + (shift - 1) * base), grid, rtol=0, atol=1e-9):
        return None
    return float(shift)


def scheduler_for(description: dict, latent_shape) -> Optional[FlowMatchEulerDiscreteScheduler]:
    """The diffusers scheduler that reproduces the description's ODE grid, or None (see sd3_shift_of)."""
    objective = description["objective"]
    shift = sd3_shift_of(build_objective(objective["name"], **objective["config"]), math.prod(latent_shape))
    if shift is None:
        return None
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=SCHEDULER_TRAIN_TIMESTEPS, shift=shift,
                                           use_dynamic_shifting=False)


# ------------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------------

class OmegaDiTPipeline(DiffusionPipeline):
    """Text- (or class-) to-image sampling of an exported OmegaDiT checkpoint (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer, scheduler=None, vae=None, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    # -- parts of the description ------------------------------------------------------------------------------
    @property
    def description(self) -> dict:
        return self.transformer.description

    @property
    def sampling_defaults(self) -> dict:
        from generate import SAMPLING_FALLBACKS
        return {**SAMPLING_FALLBACKS, **self.description.get("sampling", {})}

    def latent_stats(self, device):
        stats = self.description.get("latent_stats")
        if stats is None:
            raise ValueError("the exported description has no latent statistics; re-export with --latent-stats")
        return tuple(torch.tensor(stats[k], device=device, dtype=torch.float32).reshape(-1, 1, 1)
                     for k in ("mean", "std"))

    # -- conditions ----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: List[str], device) -> torch.Tensor:
        """Caption tokens (N, text_len, dim) float32, as models/text_encoder.TextEncoder computes them in training."""
        from models.text_encoder import TextEncoder

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        config = self.description["conditioner"]["config"]
        encoder = TextEncoder(self.text_encoder, self.tokenizer, max_length=config["text_len"],
                              name=config.get("text_encoder", ""), clip_output=config.get("clip_output", "penultimate"))
        with torch.autocast(torch.device(device).type, enabled=False):
            return encoder(list(prompts)).to(device)

    def _conditions(self, prompt, prompt_embeds, class_labels, num_images_per_prompt, device):
        backbone = self.transformer.backbone
        if backbone.conditioning == "text":
            if prompt_embeds is None:
                if prompt is None:
                    raise ValueError("a text model needs a prompt (or prompt_embeds)")
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = self.encode_prompt(prompts, device)
            y = prompt_embeds.to(device, torch.float32)
        else:
            labels = class_labels if class_labels is not None else prompt
            if labels is None:
                raise ValueError("a class-conditional model needs class_labels")
            labels = [labels] if isinstance(labels, int) else list(labels)
            y = torch.as_tensor(labels, dtype=torch.long, device=device)
            num_classes = backbone.config["num_classes"]
            if y.numel() and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(f"class labels must lie in [0, {num_classes})")
        return y.repeat_interleave(num_images_per_prompt, dim=0)

    # -- noise ---------------------------------------------------------------------------------------------------
    def prepare_latents(self, batch, generator, seed, device):
        shape = self.transformer.latent_shape
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either seed or generator")
            generator = [torch.Generator(device).manual_seed(seed * SEED_STRIDE + i) for i in range(batch)]
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} images")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
        else:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn((batch, *shape), generator=generator, device=gen_device)
        return noise.to(device, torch.float32), generator

    # -- sampling ------------------------------------------------------------------------------------------------
    def _scheduler_loop(self, objective, network, x, num_steps):
        shift_dim = x[0].numel()
        base = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        self.scheduler.set_timesteps(sigmas=base.tolist(), device=x.device)
        ours = objective.sampling_times(num_steps, stochastic=False, shift_dim=shift_dim)
        sigmas = self.scheduler.sigmas.detach().cpu().double().numpy()
        if len(sigmas) != len(ours) or np.abs(sigmas - np.asarray(ours)).max() > 1e-5:
            logger.warning("the scheduler's time grid differs from the checkpoint objective's (generate.py's); "
                           "pass sampler='euler' for the objective's own grid")
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = float(self.scheduler.sigmas[i])
            velocity = objective.velocity(network(x, t), x, t)
            x = self.scheduler.step(velocity, timestep, x, return_dict=False)[0].float()
        return x

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, num_images_per_prompt: int = 1, generator=None,
                 seed: Optional[int] = None, latents: Optional[torch.Tensor] = None, sampler: Optional[str] = None,
                 guidance_interval: Optional[tuple] = None, path_drop: bool = False,
                 prompt_embeds: Optional[torch.Tensor] = None, class_labels=None, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample images.

        prompt: caption(s) (text models) or class index(es) (class models; or class_labels).
        num_inference_steps, guidance_scale, guidance_interval ((low, high) in objective time, 1 = noise): default
            to the checkpoint's recorded sampling defaults (else 50, 4.0, (0, 1)), as in generate.py.
        sampler: None runs the scheduler (Euler on the ODE; the objective's default sampler when the export has no
            scheduler); a name of omegadit.sampling.SAMPLERS ('euler', 'heun', 'sde', ...) runs that sampler.
        generator: one torch.Generator for the whole batch, or a list of one per image; seed=s instead seeds image
            i with s * 1_000_003 + i, as generate.py --global-seed s does.
        latents: starting noise (N, C, H, W) instead of drawing it.
        output_type: 'pil' (uint8 rounded as generate.py's PNGs), 'np' (N, H, W, 3 float in [0, 1]), 'pt'
            (N, 3, H, W float in [0, 1]) or 'latent' (the sampled normalised latents).
        """
        from omegadit.sampling import check_sampler
        from omegadit.sampling.guidance import GuidedNetwork

        device = self._execution_device
        defaults = self.sampling_defaults
        num_steps = num_inference_steps or defaults["num_steps"]
        scale = defaults["cfg_scale"] if guidance_scale is None else guidance_scale
        interval = guidance_interval or (defaults["guidance_low"], defaults["guidance_high"])
        objective = self.transformer.objective()

        y = self._conditions(prompt, prompt_embeds, class_labels, num_images_per_prompt, device)
        batch = y.shape[0]
        if latents is None:
            noise, generator = self.prepare_latents(batch, generator, seed, device)
        else:
            if latents.shape[0] != batch:
                raise ValueError(f"latents has batch {latents.shape[0]}, the conditions {batch}")
            noise = latents.to(device, torch.float32)
        network = GuidedNetwork(self.transformer.backbone, objective, y, scale=scale, interval=tuple(interval),
                                path_drop=path_drop, channels=defaults.get("guidance_channels"))
        # float32 integration state whatever the weights' dtype; bf16/fp16 weights run their calls under autocast
        dtype = self.transformer.dtype
        low_precision = dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(torch.device(device).type, dtype=dtype if low_precision else None, enabled=low_precision):
            if sampler is None and self.scheduler is not None:
                x = self._scheduler_loop(objective, network, noise, num_steps)
            else:
                name = sampler or defaults.get("sampler") or objective.default_sampler
                x = check_sampler(name, objective)(objective, network, noise, num_steps, generator=generator)
        x = x.float()
        if output_type == "latent":
            images = x
        else:
            images = self.decode_latents(x)
            images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- decoding ------------------------------------------------------------------------------------------------
    def decode_latents(self, latents) -> torch.Tensor:
        """Normalised latents -> images (N, 3, H, W) float in about [-1, 1], as models/tokenizers decodes them."""
        mean, std = self.latent_stats(latents.device)
        raw = latents.float() * std + mean
        if self.vae is not None:
            return self.vae.decode(raw.to(self.vae.dtype)).sample.float()
        spec = self.description.get("autoencoder", "")
        if not spec.startswith("pixel"):
            raise ValueError(f"the autoencoder {spec!r} was not exported with this pipeline")
        patch = int(spec.partition(":")[2] or 4)
        return torch.nn.functional.pixel_shuffle(raw, patch)

    @staticmethod
    def postprocess(images, output_type):
        if output_type == "pil":
            from PIL import Image
            array = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            return [Image.fromarray(image) for image in array]
        unit = ((images.float() + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            return unit
        if output_type == "np":
            return unit.permute(0, 2, 3, 1).cpu().numpy()
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")


def register():
    """Make `diffusers.DiffusionPipeline.from_pretrained` find our classes by the names model_index.json records
    (it looks pipeline classes up on the diffusers module), without trust_remote_code."""
    for cls in (OmegaDiTPipeline, OmegaDiTTransformer):
        if getattr(diffusers, cls.__name__, None) is not cls:
            setattr(diffusers, cls.__name__, cls)


register()


# ------------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------------

def export_description(loaded, autoencoder=None, latent_stats=None) -> dict:
    """The checkpoint description with the decoding overrides applied (as generate.py's --tokenizer and
    --latent-stats)."""
    description = dict(loaded.description)
    if autoencoder:
        description["autoencoder"] = autoencoder
    else:
        description["autoencoder"] = loaded.autoencoder
    if latent_stats:
        from json_label_dataset import load_latent_stats
        mean, std = load_latent_stats(latent_stats)
        description["latent_stats"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    if description.get("latent_stats") is None:
        raise FileNotFoundError("the checkpoint records no latent statistics: pass --latent-stats "
                                "<data-dir>/vae-in/latents_stats.pt of the training data")
    return description


def build_pipeline(ckpt, use_ema=True, source_format=None, text_encoder=None, autoencoder=None, vae_ckpt=None,
                   latent_stats=None) -> OmegaDiTPipeline:
    """An OmegaDiTPipeline holding a checkpoint (on the CPU, float32)."""
    from models.tokenizers import PixelTokenizer, load_tokenizer
    from omegadit import checkpoint

    loaded = checkpoint.load(ckpt, use_ema=use_ema, source_format=source_format)
    description = export_description(loaded, autoencoder, latent_stats)
    transformer = OmegaDiTTransformer(description)
    transformer.backbone.load_state_dict(loaded.model.state_dict())
    transformer.eval()
    channels = transformer.latent_shape[0]
    if len(description["latent_stats"]["mean"]) != channels:
        raise ValueError(f"the latent statistics have {len(description['latent_stats']['mean'])} channels; the "
                         f"model denoises {channels}")
    tokenizer = load_tokenizer(description["autoencoder"], ckpt_path=vae_ckpt)
    vae = None if isinstance(tokenizer, PixelTokenizer) else tokenizer.vae.autoencoder
    text_model = text_tokenizer = None
    if loaded.conditioner.kind == "text":
        conditioner = loaded.conditioner.load("cpu", text_encoder)
        if conditioner.dim != loaded.model.config["text_dim"]:
            raise ValueError(f"text encoder {text_encoder or conditioner.config['text_encoder']} gives "
                             f"{conditioner.dim}-d tokens; the model expects {loaded.model.config['text_dim']}")
        text_model, text_tokenizer = conditioner.encoder.model, conditioner.encoder.tokenizer
    scheduler = scheduler_for(description, transformer.latent_shape)
    return OmegaDiTPipeline(transformer, scheduler, vae, text_model, text_tokenizer)


def export_diffusers(ckpt, out_dir, use_ema=True, source_format=None, text_encoder=None, autoencoder=None,
                     vae_ckpt=None, latent_stats=None):
    """Write the pipeline folder and its model card; returns the pipeline."""
    from pathlib import Path

    from omegadit.export.model_card import write_model_card

    pipeline = build_pipeline(ckpt, use_ema, source_format, text_encoder, autoencoder, vae_ckpt, latent_stats)
    out_dir = Path(out_dir)
    pipeline.save_pretrained(str(out_dir), safe_serialization=True)
    write_model_card(out_dir / "README.md", pipeline.description, ckpt, export="diffusers")
    return pipeline
