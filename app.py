"""A local web app to sample a checkpoint: `pip install gradio`, then `python app.py --ckpt CKPT`.

CKPT is anything generate.py --ckpt takes, or a folder written by `python -m omegadit.export diffusers`. The page
has a prompt box (a class index for class-conditional models), the number of steps, the guidance scale, the seed,
the sampler and the number of images; it shows the images in a gallery and the time they took. It listens on
127.0.0.1 only unless --host says otherwise. Image i of seed s is the image generate.py --global-seed s writes for
index i of the same prompt (samplers of omegadit.sampling; 'euler (scheduler)' is the diffusers scheduler).
"""
import argparse
import time
from pathlib import Path

import torch

SCHEDULER_CHOICE = "euler (scheduler)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint (as generate.py --ckpt) or an exported diffusers folder")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--tokenizer", default=None, help="autoencoder spec overriding the checkpoint's")
    p.add_argument("--vae-ckpt", default=None, help="VA-VAE checkpoint path")
    p.add_argument("--latent-stats", default=None, help="latents_stats.pt of the training data")
    p.add_argument("--text-encoder", default=None, help="text encoder id or directory overriding the checkpoint's")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-images", type=int, default=8, help="the most images one request may ask for")
    return p.parse_args(argv)


def load_pipeline(args):
    """An OmegaDiTPipeline for --ckpt (a checkpoint, or an exported diffusers folder)."""
    from omegadit.export.diffusers_pipeline import OmegaDiTPipeline, build_pipeline

    ckpt = Path(args.ckpt)
    if (ckpt / "model_index.json").is_file():
        pipe = OmegaDiTPipeline.from_pretrained(str(ckpt))
    else:
        pipe = build_pipeline(ckpt, use_ema=not args.no_ema, text_encoder=args.text_encoder,
                              autoencoder=args.tokenizer, vae_ckpt=args.vae_ckpt, latent_stats=args.latent_stats)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sampler_choices(pipe) -> list:
    """The samplers that apply to the checkpoint's objective, the scheduler first when the export has one."""
    from omegadit.sampling import SAMPLERS

    family = pipe.transformer.objective().family
    ours = [name for name in SAMPLERS.names() if family in SAMPLERS.get(name).families]
    return ([SCHEDULER_CHOICE] if pipe.scheduler is not None else []) + ours


class Sampler:
    """The app's one action: (prompt, steps, guidance, seed, sampler, number of images) -> (images, time)."""

    def __init__(self, pipe, max_images=8):
        self.pipe = pipe
        self.max_images = max_images
        self.text = pipe.transformer.backbone.conditioning == "text"

    def __call__(self, prompt, steps, guidance, seed, sampler, num_images):
        num_images = int(num_images)
        if not 1 <= num_images <= self.max_images:
            raise ValueError(f"ask for 1 to {self.max_images} images")
        if self.text:
            if not str(prompt).strip():
                raise ValueError("type a prompt")
            condition = {"prompt": [str(prompt)] * num_images}
        else:
            condition = {"class_labels": [int(prompt)] * num_images}
        started = time.perf_counter()
        images = self.pipe(**condition, num_inference_steps=int(steps), guidance_scale=float(guidance),
                           seed=int(seed), sampler=None if sampler == SCHEDULER_CHOICE else sampler).images
        elapsed = time.perf_counter() - started
        return images, f"{num_images} image(s) in {elapsed:.2f} s ({elapsed / num_images:.2f} s per image)"


def build_app(pipe, max_images=8):
    """The gradio Blocks app around a pipeline (gradio is imported here, so the rest of the file needs none)."""
    try:
        import gradio as gr
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the web app needs gradio: pip install gradio") from err

    sample = Sampler(pipe, max_images)
    defaults = pipe.sampling_defaults
    choices = sampler_choices(pipe)
    name = pipe.description["backbone"].get("name", "OmegaDiT")
    with gr.Blocks(title=f"OmegaDiT {name}") as app:
        gr.Markdown(f"# OmegaDiT {name}")
        with gr.Row():
            with gr.Column():
                if sample.text:
                    prompt = gr.Textbox(label="Prompt", value="a red circle on the left", lines=2)
                else:
                    prompt = gr.Number(label="Class index", value=0, precision=0, minimum=0,
                                       maximum=pipe.transformer.backbone.config["num_classes"] - 1)
                steps = gr.Slider(1, 250, value=int(defaults["num_steps"]), step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=float(defaults["cfg_scale"]), step=0.1, label="Guidance scale")
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                sampler = gr.Dropdown(choices, value=choices[0], label="Sampler")
                count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Images")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Samples", columns=4, format="png")
                timing = gr.Textbox(label="Time", interactive=False)
        run.click(sample, inputs=[prompt, steps, guidance, seed, sampler, count], outputs=[gallery, timing],
                  api_name="generate")
    return app


def main(args):
    pipe = load_pipeline(args)
    app = build_app(pipe, args.max_images)
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main(parse_args())
