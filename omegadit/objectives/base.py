"""The objective interface: what train.py's loss and the samplers need from a diffusion formulation.

Time convention shared by every objective and sampler: t in [0, 1], t = 1 is pure noise, t = 0 is data.
An objective owns the noise path, the prediction type, how training times are drawn (and shifted), its named
loss terms, the time the network is given (`network_time`) and the conversions samplers use.
"""
from typing import NamedTuple

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class ObjectiveOutput(NamedTuple):
    """One training forward pass: named per-sample loss terms (each (N,), summed into the loss with weight 1),
    the network's prediction and its regression target, the times used (N, 1, 1, 1) and the network's aux dict."""
    terms: dict
    prediction: torch.Tensor
    target: torch.Tensor
    time: torch.Tensor
    aux: dict


class Objective:
    """Base class. Subclasses set `name` (registry key), `family` (which samplers apply: 'flow' or 'gaussian'),
    `default_sampler`, `term_names` (the keys of ObjectiveOutput.terms), and implement `__call__` (training) and
    `network_time`."""

    name = ""
    family = ""
    default_sampler = ""
    term_names = ()

    def __init__(self, **config):
        self.config = config

    def __call__(self, model, x0, model_kwargs=None, generator=None) -> ObjectiveOutput:
        raise NotImplementedError

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with, for objective times t."""
        raise NotImplementedError

    def describe(self) -> dict:
        """{'name', 'config'}: what a checkpoint records to rebuild this objective."""
        return {"name": self.name, "config": dict(self.config)}
