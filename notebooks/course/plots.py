"""The course's figures, kept out of the notebooks so that a reader sees the idea, not the matplotlib.

Every function takes the numbers a notebook computed and returns a matplotlib figure; none computes
anything the notebook has not asserted. `save(fig, name)` writes `figures/<name>.png` only when the
environment variable MINIMIMO_WRITE_FIGURES=1 is set, so running a notebook (or the test suite)
leaves the repository as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

FIGURES = Path(__file__).resolve().parents[2] / "figures"
COLORS = {"global": "#1f4e79", "sliding": "#f4a259", "dense": "#6a994e", "moe": "#bc4749",
          "light": "#9ec1de", "grey": "#e9e9e9"}


def save(fig, name: str) -> None:
    """Write figures/<name>.png when MINIMIMO_WRITE_FIGURES=1; otherwise do nothing."""
    if os.environ.get("MINIMIMO_WRITE_FIGURES") == "1":
        fig.savefig(FIGURES / f"{name}.png", dpi=120, bbox_inches="tight")
