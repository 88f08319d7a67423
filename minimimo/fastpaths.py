"""The decode fast paths, in one list, and a switch back to the readable references.

A decode step of a small model is bound by per-op overhead, not arithmetic: every torch call
issued from Python costs a few microseconds whatever its size. Each fast path below issues fewer
calls for the same result, and each sits beside the einops reference it replaces, which stays
the code the notebooks teach (as nanoGPT keeps its manual attention beside the flash one):

    switch                         fast path                               reference
    Attention.use_sdpa             masks once per forward, matmuls on      visibility_mask + sink_attention
                                   views (torch's SDPA off the CPU)
    Experts.use_few_pairs          a few (token, expert) pairs grouped     the sorted dispatch
                                   on Python ints
    Experts.use_grouped_mm         one grouped_mm per projection           the per-expert loop
    RMSNorm.use_fused              one torch.rms_norm call                 the formula spelled out
    RopeTables.use_folded          rotate-half folded into the tables      apply_rope as written

`tests/test_fast_attention.py` and `tests/test_fast_paths.py` hold every fast path equal to its
reference, alone and in whole models (padding, wrapping rings, chunked prefill, bfloat16, FP8,
MTP drafting); on the CPU they are equal bit for bit.

    with minimimo.reference_paths():
        logits = model(ids)       # every layer on its reference path
"""

from __future__ import annotations

from contextlib import contextmanager

from .attention import Attention
from .moe import Experts
from .norm import RMSNorm
from .rope import RopeTables

FAST_PATHS = ((Attention, "use_sdpa"), (Experts, "use_few_pairs"), (Experts, "use_grouped_mm"),
              (RMSNorm, "use_fused"), (RopeTables, "use_folded"))


@contextmanager
def reference_paths():
    """Inside the block, every fast path is off (the class switches above set to False); on
    leaving, each switch gets back the value it had."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in FAST_PATHS]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, False)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
