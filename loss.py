"""The training loss: an objective's terms plus weighted auxiliary losses.

`TrainingLoss` is what train.py calls for any objective (omegadit/objectives/). `SILoss` is OmegaDiT's
stochastic-interpolant loss in the original's calling convention: flow matching + REPA projection + contrastive
flow matching, with time shifting.
"""
from typing import NamedTuple, Optional

import torch

from omegadit.objectives.auxiliary import CFM_WEIGHTINGS, ContrastiveFlowMatching, RepaLoss, projection_loss
from omegadit.objectives.base import mean_flat
from omegadit.objectives.flow import DEFAULT_SHIFT_BASE, PATH_TYPES, TIME_WEIGHTINGS, FlowMatching, interpolant, time_shift

__all__ = ["TrainingLoss", "SILoss", "LossOutput", "projection_loss", "interpolant", "time_shift", "mean_flat",
           "PATH_TYPES", "TIME_WEIGHTINGS", "CFM_WEIGHTINGS"]


class TrainingLoss:
    """loss = mean over the batch of the objective's terms + sum of coefficient x auxiliary loss.

    aux_losses: {name: (loss, coefficient)}; a coefficient of 0 skips that loss. Returns (loss, {term: value}),
    the values detached scalars (no host sync)."""

    def __init__(self, objective, aux_losses: Optional[dict] = None):
        self.objective = objective
        self.aux_losses = {name: pair for name, pair in (aux_losses or {}).items() if pair[1] != 0}

    @property
    def term_names(self) -> list:
        """Names of the logged terms, in a fixed order."""
        return list(self.objective.term_names) + list(self.aux_losses)

    def __call__(self, model, x0, model_kwargs=None, encoder_features=(), generator=None):
        output = self.objective(model, x0, model_kwargs, generator=generator)
        values = {name: term.mean() for name, term in output.terms.items()}
        total = sum(values.values())
        for name, (aux_loss, coefficient) in self.aux_losses.items():
            values[name] = aux_loss(output, encoder_features)
            total = total + coefficient * values[name]
        return total, {name: value.detach().float() for name, value in values.items()}


class LossOutput(NamedTuple):
    """Loss parts: denoising (N,), proj (scalar), cfm (scalar), time (N,1,1,1) actually used (after shifting)."""
    denoising: torch.Tensor
    proj: torch.Tensor
    cfm: torch.Tensor
    time: torch.Tensor

    def total(self, proj_coeff: float = 0.0, cfm_coeff: float = 0.0) -> torch.Tensor:
        """Scalar training loss: mean(denoising) + proj_coeff * proj + cfm_coeff * cfm."""
        return self.denoising.mean() + proj_coeff * self.proj + cfm_coeff * self.cfm


class SILoss:
    """OmegaDiT's loss with the original's signature: `SILoss(...)(model, images, model_kwargs, zs, time_input,
    noises)` -> LossOutput. Built from FlowMatching, RepaLoss and ContrastiveFlowMatching."""

    def __init__(self, prediction="v", path_type="linear", weighting="uniform", cfm_weighting="uniform",
                 apply_time_shift=False, shift_base=DEFAULT_SHIFT_BASE):
        if prediction != "v":
            raise ValueError(f"SILoss predicts velocity only (prediction='v'), got {prediction!r}")
        self.objective = FlowMatching(path_type=path_type, weighting=weighting, time_shifting=apply_time_shift,
                                      shift_base=shift_base)
        self.repa = RepaLoss()
        self.cfm = ContrastiveFlowMatching(cfm_weighting)

    def __call__(self, model, images, model_kwargs=None, zs=None, time_input=None, noises=None,
                 generator: Optional[torch.Generator] = None) -> LossOutput:
        """Loss on a batch of images (N, C, H, W); zs: target encoder features (N, tokens, z_dim)."""
        output = self.objective(model, images, model_kwargs, generator=generator, time_input=time_input,
                                noise=noises)
        zs = [] if zs is None else zs
        return LossOutput(output.terms["denoise"], self.repa(output, zs), self.cfm(output, zs), output.time)
