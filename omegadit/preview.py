"""Sample grids during training: fixed noise and conditions, the EMA (or raw) weights, one PNG per call."""
from pathlib import Path

import torch

from omegadit.sampling import sample
from omegadit.sampling.guidance import GuidedNetwork
from utils import image_grid


class SampleWriter:
    """Writes <directory>/<step>.png: a grid of samples of fixed prompts (or labels) under their captions."""

    def __init__(self, directory, objective, conditioner, decode, conditions, latent_shape, device, seed=0,
                 sampler=None, num_steps=50, cfg_scale=4.0, interval=(0.0, 1.0)):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.objective = objective
        self.decode = decode
        self.captions = [str(c) for c in conditions]
        self.condition = conditioner(conditions, device)
        self.noise = torch.randn(len(conditions), *latent_shape, generator=torch.Generator().manual_seed(seed))
        self.noise = self.noise.to(device)
        self.seed = seed
        self.sampler = sampler or objective.default_sampler
        self.num_steps = num_steps
        self.cfg_scale = cfg_scale
        self.interval = tuple(interval)

    @torch.no_grad()
    def write(self, model, step, autocast) -> Path:
        """Sample with `model` (the EMA, or the raw weights in eval mode) under `autocast` and write the grid;
        returns its path."""
        network = GuidedNetwork(model, self.objective, self.condition, scale=self.cfg_scale, interval=self.interval)
        with autocast():
            latents = sample(self.sampler, self.objective, network, self.noise, self.num_steps,
                             generator=torch.Generator(self.noise.device).manual_seed(self.seed))
        images = self.decode(latents.float())
        path = self.directory / f"{step:07d}.png"
        image_grid(images.permute(0, 2, 3, 1).cpu().numpy(), self.captions).save(path)
        return path
