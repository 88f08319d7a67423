"""Concept diagrams drawn with matplotlib: what a reader should picture before the code.

Notebooks 00-03: the decoder block, the hybrid layer pattern, GQA grouping, the ring buffer's
read-before-write. Each function returns a figure; `plots.save` writes it when asked.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .plots import COLORS
