"""What the course notebooks build, kept in one place so that a later notebook can import it.

Like `previous_chapters.py` in rasbt's LLMs-from-scratch: notebook 01 builds partial RoPE, notebook 02
imports it from `course.layers` instead of writing it again, and the capstone (06) assembles the whole
model from these functions. Every function here is asserted against `minimimo` in the notebook that
builds it. Run the notebooks from `notebooks/` (solutions add `..` to `sys.path`).

    layers.py    RMSNorm, partial RoPE, masks from positions, sink + sliding-window attention, KV caches
    moe.py       the sigmoid router, expert dispatch, SwiGLU (notebook 04)
    mtp.py       the multi-token-prediction block (notebook 05)
    fp8.py       FP8 block dequantization (notebook 07)
    plots.py     the figures, so that plotting code stays out of the reader's way; save() writes
                 figures/ only when MINIMIMO_WRITE_FIGURES=1
    diagrams.py  concept diagrams drawn with matplotlib
    checks.py    one check per exercise: says "correct" or explains what is wrong
"""
