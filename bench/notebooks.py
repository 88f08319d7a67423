"""Notebook run times: every notebook executed top to bottom, beside another checkout.

    python bench/notebooks.py                        # this checkout only
    python bench/notebooks.py --base OTHER_CHECKOUT  # side by side (e.g. a `git worktree` of an older commit)
    python bench/notebooks.py --only 03 05           # notebooks whose name starts with these

Each notebook is executed with nbclient in a fresh kernel whose working directory is the
checkout's `notebooks/` (so `course` is that checkout's) and whose PYTHONPATH starts with the
checkout (so `minimimo` is that checkout's), as CI runs it; the executed copy is thrown away (the
committed notebook is never written). The checkouts are interleaved per notebook (A B A B ...) so
that a slow patch of a busy machine hits both alike. Printed per notebook: the median wall time of
`--runs` runs per checkout (kernel start included, ~4 s) and this checkout's speed relative to the
base (> 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parents[1]


def run_once(checkout: Path, notebook_name: str, timeout: int) -> float:
    """Seconds to execute checkout/notebooks/<name> in a fresh kernel that imports that checkout."""
    folder = checkout / "notebooks"
    notebook = nbformat.read(folder / notebook_name, as_version=4)
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env_before]))
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        start = time.perf_counter()
        NotebookClient(notebook, timeout=timeout, resources={"metadata": {"path": str(folder)}}).execute()
        return time.perf_counter() - start
    finally:
        if env_before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=None, help="another checkout to compare with")
    p.add_argument("--only", nargs="*", default=None, help="notebook name prefixes (default: all)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = p.parse_args(argv)
    names = sorted(path.name for path in (HERE / "notebooks").glob("*.ipynb"))
    if args.only:
        names = [n for n in names if n.startswith(tuple(args.only))]
    checkouts = [("this", HERE)] + ([("base", args.base.resolve())] if args.base else [])
    for label, checkout in checkouts:
        print(f"{label}: {checkout}")
    print(f"{'notebook':40s}" + "".join(f"{label + ' s':>10s}" for label, _ in checkouts)
          + ("   this/base speed" if args.base else ""))
    totals = {label: 0.0 for label, _ in checkouts}
    for name in names:
        times = {label: [] for label, _ in checkouts}
        for _ in range(args.runs):
            for label, checkout in checkouts:
                if (checkout / "notebooks" / name).is_file():
                    times[label].append(run_once(checkout, name, args.timeout))
        medians = {label: statistics.median(t) if t else float("nan") for label, t in times.items()}
        for label, value in medians.items():
            totals[label] += value
        line = f"{name:40s}" + "".join(f"{medians[label]:10.1f}" for label, _ in checkouts)
        if args.base:
            line += f"   {medians['base'] / medians['this']:.2f}x"
        print(line, flush=True)
    print(f"{'total':40s}" + "".join(f"{totals[label]:10.1f}" for label, _ in checkouts)
          + (f"   {totals['base'] / totals['this']:.2f}x" if args.base else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
