"""The evaluation's one figure, per-query histogram of a measure, and the PNG helper the report
figures (common/report/plots.py) share (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import io
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, CI, training processes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure_png(fig, dpi: int = 100) -> bytes:
    """Render and close a figure; PNG bytes."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def plot_per_query(values: Mapping[str, float], measure: str) -> bytes:
    """Histogram of one measure over queries (how many queries fail, how many are solved)."""
    data = np.asarray(list(values.values()), dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    low, high = min(0.0, float(data.min())), max(1.0, float(data.max()))  # IR measures: [0, 1]
    ax.hist(data, bins=np.linspace(low, high, 21), color="#1f78b4", edgecolor="white")
    ax.axvline(data.mean(), color="#e31a1c", linestyle="--", label=f"mean {data.mean():.4f}")
    ax.set_xlabel(f"per-query {measure}")
    ax.set_ylabel("queries")
    ax.set_title(f"{measure} over {len(data)} queries")
    ax.legend(fontsize=8)
    return figure_png(fig)
