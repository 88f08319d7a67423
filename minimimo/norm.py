"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight.

    y = w * x / sqrt(mean(x^2) + eps)

The statistics are computed in float32 whatever the activation dtype; the normalised vector is
cast back to the activation dtype *before* the weight multiply (the Llama convention the official
implementation follows; in bfloat16 the order of those two roundings is visible in the logits).
MiMo uses it before attention, before the MLP, at the end of the stack and in the MTP blocks.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
