"""PNG figures of the diagnostics (matplotlib, Agg backend: no display needed).

Every `plot_*` function returns the PNG as bytes, so callers can write it to a file, embed it in
an HTML page (common/eval/html.py) or log it to tensorboard (`png_to_array`).
"""
from __future__ import annotations

import io
from typing import Mapping

import matplotlib
from threadpoolctl import threadpool_limits

matplotlib.use("Agg")  # before pyplot: headless machines, CI, training processes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from twotower.common.eval.figures import figure_png  # noqa: E402
from twotower.common.report.diagnostics import Diagnostics, l2_normalize  # noqa: E402

QUERY_COLOUR, DOC_COLOUR = "#d95f02", "#1b9e77"
PROJECTIONS = ("tsne", "pca")


def project_2d(points: np.ndarray, method: str = "tsne", seed: int = 0,
               perplexity: float | None = None) -> np.ndarray:
    """2-D coordinates of L2-normalised `points` (so Euclidean distance orders pairs as cosine
    does). t-SNE (scikit-learn, PCA initialisation, fixed seed) or PCA (exact SVD, fast)."""
    x = l2_normalize(points)
    if len(x) < 4:
        raise ValueError(f"a 2-D projection needs at least 4 points, got {len(x)}")
    if method == "pca":
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        return coords if coords.shape[1] == 2 else np.pad(coords, ((0, 0), (0, 1)))
    if method != "tsne":
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {method!r}")
    from sklearn.manifold import TSNE

    # scikit-learn requires perplexity < n; 30 is its default and the usual choice
    perplexity = perplexity or float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto")
    # One OpenMP thread: scikit-learn's Barnes-Hut gradient spins its OpenMP threads, and on a
    # busy machine (training processes, shared CPUs) that made 100 points take 46 s instead of
    # 0.3 s here; single-threaded it handles a few thousand points in seconds.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x)


def png_to_array(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array [H, W, 3] (RGB), the layout tensorboard's add_image takes with
    dataformats="HWC"."""
    image = plt.imread(io.BytesIO(png), format="png")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _draw_towers(ax, coords: np.ndarray, n_queries: int, method: str) -> None:
    q, d = coords[:n_queries], coords[n_queries:]
    ax.scatter(d[:, 0], d[:, 1], s=9, c=DOC_COLOUR, alpha=0.55, label=f"documents ({len(d)})",
               linewidths=0)
    ax.scatter(q[:, 0], q[:, 1], s=12, c=QUERY_COLOUR, alpha=0.8, marker="^",
               label=f"queries ({len(q)})", linewidths=0)
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of query and document embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=1.5)


def _draw_distances(ax, diag: Diagnostics) -> None:
    bins = np.linspace(0.0, 2.0, 41)  # distances between unit vectors lie in [0, 2]
    style = dict(bins=bins, density=True, histtype="step", linewidth=1.8)
    if diag.top1_is_positive is not None and diag.top1_is_positive.any():
        hit = diag.top1_is_positive
        ax.hist(diag.top1_distances[hit], label=f"top-1, judged relevant ({hit.sum()})",
                color="#1f78b4", **style)
        if (~hit).any():
            ax.hist(diag.top1_distances[~hit], label=f"top-1, not judged relevant ({(~hit).sum()})",
                    color="#e31a1c", **style)
    else:
        ax.hist(diag.top1_distances, label=f"query → top-1 document ({diag.n_queries})",
                color="#1f78b4", **style)
    if len(diag.positive_distances):
        ax.hist(diag.positive_distances, label=f"query → judged positive ({diag.n_positive_pairs})",
                color="#33a02c", linestyle="--", **style)
    ax.hist(diag.random_distances, label="query → random document", color="#777777",
            linestyle=":", **style)
    ax.set_xlim(0, 2)
    ax.set_xlabel("distance between normalised embeddings  ||q - d||")
    ax.set_ylabel("density")
    ax.set_title("Query → document distances")
    ax.legend(fontsize=8)


def plot_towers(coords: np.ndarray, n_queries: int, method: str = "tsne") -> bytes:
    """Scatter of 2-D coordinates: the first `n_queries` rows are queries, the rest documents."""
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    _draw_towers(ax, coords, n_queries, method)
    return figure_png(fig)


def plot_distance_histograms(diag: Diagnostics) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _draw_distances(ax, diag)
    return figure_png(fig)


def plot_overview(coords: np.ndarray, n_queries: int, diag: Diagnostics,
                  method: str = "tsne", title: str | None = None) -> bytes:
    """Both panels side by side, one image (what training logs to tensorboard)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    _draw_towers(left, coords, n_queries, method)
    _draw_distances(right, diag)
    if title:
        fig.suptitle(title)
    return figure_png(fig, dpi=80)


def plot_compare_bars(values: Mapping[str, Mapping[str, float]], measure: str,
                      marks: Mapping[str, Mapping[str, str]] | None = None,
                      note: str | None = None) -> bytes:
    """Grouped bars: one group per dataset (column), one bar per run. `values[run][dataset]`;
    `marks[run][dataset]` is appended to the value above a bar (significance marks); `note` is
    a second title line (e.g. what the marks mean)."""
    runs = list(values)
    datasets: list[str] = []
    for by_dataset in values.values():
        datasets += [d for d in by_dataset if d not in datasets]
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(datasets))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.3 * len(datasets) * max(1, len(runs) / 2)), 4))
    for i, run in enumerate(runs):
        heights = [values[run].get(d, np.nan) for d in datasets]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=run)
        for bar, dataset in zip(bars, datasets):
            if np.isfinite(bar.get_height()):
                text = f"{bar.get_height():.3f}" + (marks or {}).get(run, {}).get(dataset, "")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, datasets, rotation=20 if len(datasets) > 4 else 0)
    ax.set_ylabel(measure)
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) * 1.08)  # room for the labels
    ax.set_title(f"{measure} per dataset" + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(fig)

