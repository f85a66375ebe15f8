"""Auxiliary training losses added to an objective's terms with a coefficient: REPA and contrastive flow matching.

Each is called as `loss(output, encoder_features)` with the objective's `ObjectiveOutput` and the frozen
encoders' features of the clean images, and returns a scalar.
"""
import torch
import torch.nn.functional as F

from omegadit.objectives import AUX_LOSSES

CFM_WEIGHTINGS = ("uniform", "linear")


def projection_loss(zs, zs_tilde) -> torch.Tensor:
    """REPA loss (Yu et al. 2024, sec. 3.2): negative cosine similarity between projector outputs and encoder
    features, averaged over tokens, encoders and batch."""
    if len(zs) == 0 or len(zs) != len(zs_tilde):
        raise ValueError(f"{len(zs)} target encoder features but the model returned {len(zs_tilde)} projector outputs")
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        cosine = (F.normalize(z, dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)
        total = total - cosine.mean()
    return total / len(zs)


@AUX_LOSSES.register("proj")
class RepaLoss:
    """REPA: aligns the backbone's aux['repa'] projector outputs with the encoder features; 0 without encoders."""

    def __call__(self, output, encoder_features) -> torch.Tensor:
        if not len(encoder_features):
            return output.prediction.new_zeros(())
        return projection_loss(encoder_features, output.aux.get("repa", []))


@AUX_LOSSES.register("cfm")
class ContrastiveFlowMatching:
    """Contrastive flow matching (Stoica et al. 2025): -mean |prediction - target of another sample|^2 (the batch
    rolled by one), 'uniform' or 'linear' (each element weighted by its time t)."""

    def __init__(self, weighting="uniform"):
        if weighting not in CFM_WEIGHTINGS:
            raise ValueError(f"unknown cfm_weighting {weighting!r}, expected one of {CFM_WEIGHTINGS}")
        self.weighting = weighting

    def __call__(self, output, encoder_features) -> torch.Tensor:
        error = (output.prediction - torch.roll(output.target, shifts=1, dims=0)) ** 2
        if self.weighting == "linear":
            error = error * output.time
        return -error.mean()
