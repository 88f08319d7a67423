"""minimimo: MiMo-V2-Flash from scratch, in readable PyTorch + einops, equal to the official outputs.

    import minimimo
    model = minimimo.load("path/to/checkpoint", dtype="float32")
    logits = model(input_ids)          # [batch, seq, vocab]
"""

from .checkpoint import CheckpointError, load
from .config import MiMoConfig
from .model import MiMoForCausalLM

__version__ = "0.1.0"
__all__ = ["MiMoConfig", "MiMoForCausalLM", "load", "CheckpointError", "__version__"]
