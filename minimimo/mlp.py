"""The dense SwiGLU MLP: layer 0 of MiMo-V2-Flash and every MTP block (intermediate 16384).

    mlp(x) = down( silu(gate(x)) * up(x) )

Each routed expert of the MoE layers is the same function with a smaller intermediate size
(2048); see `moe.py`, which stores the 256 experts stacked instead of as 256 modules.
"""

from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
