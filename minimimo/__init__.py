"""minimimo: MiMo-V2-Flash from scratch, in readable PyTorch + einops, equal to the official outputs.

    import minimimo
    model = minimimo.load("path/to/checkpoint", dtype="float32")
    logits = model(input_ids)          # [batch, seq, vocab]
"""

from .cache import HybridCache
from .chat import Conversation, format_chat, parse_reply
from .checkpoint import CheckpointError, load
from .config import MiMoConfig
from .defaults import default_checkpoint
from .fastpaths import reference_paths
from .generate import generate, stream
from .model import MiMoForCausalLM
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["MiMoConfig", "MiMoForCausalLM", "HybridCache", "load", "generate", "stream", "CheckpointError",
           "Tokenizer", "Conversation", "format_chat", "parse_reply", "default_checkpoint",
           "reference_paths", "__version__"]
