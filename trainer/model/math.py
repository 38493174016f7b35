"""Discrete regression in symlog space (docs/tdmpc2.md#two-hot) and the running Q scale
(docs/tdmpc2.md#running-scale).

Pure tensor functions plus one small stateful module; nothing here knows about devices
beyond following its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def symlog(x: Tensor) -> Tensor:
    """sign(x) * ln(1 + |x|)."""
    return torch.sign(x) * torch.log(1 + torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """sign(x) * (exp(|x|) - 1), the inverse of `symlog`."""
    return torch.sign(x) * (torch.exp(torch.abs(x)) - 1)


def two_hot(x: Tensor, num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0) -> Tensor:
    """Two-hot encoding of scalars `x` [B, 1] in symlog space -> [B, num_bins].

    Bin i gets 1 - f and bin (i + 1) mod num_bins gets f, where (i + f) is the position of
    clamp(symlog(x)) on the grid. At the top of the range the second index wraps to bin 0
    with weight 0 (as in the official code).
    """
    bin_size = (vmax - vmin) / (num_bins - 1)
    x = torch.clamp(symlog(x), vmin, vmax).squeeze(1)
    bin_idx = torch.floor((x - vmin) / bin_size)
    bin_offset = ((x - vmin) / bin_size - bin_idx).unsqueeze(-1)
    bin_idx = bin_idx.long().unsqueeze(1)
    out = torch.zeros(x.shape[0], num_bins, device=x.device, dtype=x.dtype)
    out = out.scatter(1, bin_idx, 1 - bin_offset)
    return out.scatter(1, (bin_idx + 1) % num_bins, bin_offset)


def two_hot_inv(logits: Tensor, vmin: float = -10.0, vmax: float = 10.0) -> Tensor:
    """Scalar value of bin logits [..., K] -> [..., 1]: symexp of the expected bin centre,
    computed in float32 whatever the logits' dtype (bins rounded to bf16 round the value)."""
    bins = torch.linspace(vmin, vmax, logits.shape[-1], device=logits.device, dtype=torch.float32)
    probs = F.softmax(logits.float(), dim=-1)
    return symexp(torch.sum(probs * bins, dim=-1, keepdim=True))


def soft_ce(logits: Tensor, target: Tensor, vmin: float = -10.0, vmax: float = 10.0) -> Tensor:
    """Cross-entropy of bin logits [B, K] against the two-hot of scalar targets [B, 1] -> [B, 1]."""
    log_probs = F.log_softmax(logits, dim=-1)
    target = two_hot(target, logits.shape[-1], vmin, vmax)
    return -(target * log_probs).sum(-1, keepdim=True)


class RunningScale(nn.Module):
    """Running estimate S of the P95 - P5 spread of Q, used to normalise the pi loss.

    update(x): S <- S + tau * (max(P95(x) - P5(x), 1) - S), percentiles over the leading
    axis with linear interpolation at positions p * (N - 1) / 100. S starts at 1.

    `torch.quantile` interpolates the same way but rounds differently: on 750 random inputs
    (N 3..4096) 401 results differed in the last bits. The percentile is written out as the
    official code computes it, so that updates stay bit-identical to it.
    """

    def __init__(self, tau: float = 0.01) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("value", torch.ones(1, dtype=torch.float32))
        self.register_buffer("percentiles", torch.tensor([5, 95], dtype=torch.float32))

    def _percentile(self, x: Tensor) -> Tensor:
        dtype, shape = x.dtype, x.shape
        x = x.flatten(1, x.ndim - 1) if x.ndim > 1 else x.unsqueeze(1)
        ordered = torch.sort(x, dim=0).values
        n = x.shape[0]
        positions = self.percentiles * (n - 1) / 100
        floored = torch.floor(positions)
        ceiled = floored + 1
        ceiled = torch.where(ceiled > n - 1, n - 1, ceiled)
        weight_ceiled = (positions - floored).unsqueeze(1)
        weight_floored = 1.0 - weight_ceiled
        low = ordered[floored.long()] * weight_floored
        high = ordered[ceiled.long()] * weight_ceiled
        return (low + high).reshape(-1, *shape[1:]).to(dtype)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Move S towards the clamped P95 - P5 spread of `x` (over its first axis)."""
        percentiles = self._percentile(x.detach())
        spread = torch.clamp(percentiles[1] - percentiles[0], min=1.0)
        self.value.lerp_(spread, self.tau)

    def forward(self, x: Tensor) -> Tensor:
        """x / S."""
        return x / self.value
