"""The network as samplers see it: `network(x, t) -> float32 output`, with classifier-free guidance.

Guidance (Ho & Salimans 2022): out = out_u + w (out_c - out_u) on the raw network output, the conditional and
unconditional halves in one batched call, only for t in the guidance interval [low, high] (objective time,
1 = noise). `channels` limits guidance to the first channels (DiT and LightningDiT guide three; the rest comes
from the conditional half). `path_drop` asks the backbone to drop its sparse path in the unconditional half (SiT):
the backbone is called with uncond=N, the number of conditional samples leading the batch, so that it can skip the
sparse blocks for the rest. `model_kwargs` are further inputs of the model (a ControlNet's control images and
scale); their tensors are given to both halves.
"""
import math

import torch


class GuidedNetwork:
    """Calls `model(x, network_time(t), y=...)` and applies guidance; w == 1 is a single conditional call."""

    def __init__(self, model, objective, y, y_null=None, scale=1.0, interval=(0.0, 1.0), path_drop=False,
                 channels=None, model_kwargs=None):
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        low, high = interval
        if low > high:
            raise ValueError(f"guidance interval low {low} is above high {high}")
        self.model = model
        self.objective = objective
        self.y = y
        self.scale = scale
        self.interval = (low, high)
        self.path_drop = path_drop
        self.channels = channels
        self.model_kwargs = dict(model_kwargs or {})
        self.y_null = self._null(y_null) if scale != 1.0 else None
        if self.y_null is not None:  # the doubled batch of the guided steps, built once for all steps
            self.y_both = torch.cat([y, self.y_null])
            self.kwargs_both = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
                                for k, v in self.model_kwargs.items()}

    def _null(self, y_null):
        batch = self.y.shape[0]
        if y_null is None:
            if not hasattr(self.model, "null_condition"):
                raise ValueError("guidance needs y_null (the null caption embedding or class) or a model with "
                                 "null_condition(batch_size, device)")
            y_null = self.model.null_condition(batch, self.y.device)
        if y_null.shape[0] == 1 and batch > 1:
            y_null = y_null.expand(batch, *y_null.shape[1:])
        if y_null.shape[0] != batch:
            raise ValueError(f"y_null has batch size {y_null.shape[0]}, the condition has {batch}")
        return y_null

    def scale_at(self, t: float) -> float:
        """The guidance scale in force at time t."""
        low, high = self.interval
        return self.scale if low <= t <= high else 1.0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        n = x.shape[0]
        w = self.scale_at(t)
        t_net = self.objective.network_time(torch.full((n,), t, device=x.device))
        if w == 1.0:
            return self.model(x, t_net, y=self.y, **self.model_kwargs)[0].float()
        kwargs = dict(self.kwargs_both)
        if self.path_drop:
            kwargs["uncond"] = n  # the samples from n on are the unconditional half
        out = self.model(torch.cat([x, x]), torch.cat([t_net, t_net]), y=self.y_both, **kwargs)
        cond, uncond = out[0].float().chunk(2)
        guided = uncond + w * (cond - uncond)
        if self.channels is not None:
            guided = torch.cat([guided[:, :self.channels], cond[:, self.channels:]], dim=1)
        return guided
