"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight.

    y = w * x / sqrt(mean(x^2) + eps)

The statistics are computed in float32 whatever the activation dtype; the normalised vector is
cast back to the activation dtype *before* the weight multiply (the Llama convention the official
implementation follows; in bfloat16 the order of those two roundings is visible in the logits).
MiMo uses it before attention, before the MLP, at the end of the stack and in the MTP blocks.

`RMSNorm.forward` spells the formula out in eight torch calls; on the CPU, `use_fused` hands the
float32 part to torch's `rms_norm`, one call with the same result bit for bit (checked for every
width up to 139 and the usual powers of two, tests/test_fast_paths.py), and skips the casts that
change nothing. A decode step runs two norms per layer, and each torch call costs a few
microseconds of dispatch whatever its size.
"""

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    use_fused = True  # False: always the formula spelled out (the reference)

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and x.device.type == "cpu":  # CUDA's fused kernel sums in another order
            return self.fused(x)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """`forward`'s result in one torch call (float32) or four (other dtypes) instead of eight."""
        if x.dtype == self.weight.dtype == torch.float32:  # no cast between normalising and weighting
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # torch's rms_norm would multiply by the weight before casting back: the weight comes after
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
