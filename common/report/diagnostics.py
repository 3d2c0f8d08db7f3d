"""Geometry of an embedding space: the numbers the seed papers argue from.

All functions take float arrays `[n, dim]` (one row per text) and work on L2-normalised rows,
as the papers do; nothing here encodes text (see common/report/analyze.py) or draws (common/report/plots.py).

- Alignment and uniformity, Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", Eq. 4-5 (their reference code:
  `align_loss = (x - y).norm(dim=1).pow(alpha).mean()`, `uniform_loss =
  torch.pdist(x).pow(2).mul(-t).exp().mean().log()`, defaults alpha=2, t=2).
- Anisotropy: mean cosine between distinct pairs of one tower (DANCE, Li et al. 2022, shows an
  anisotropic query space; Ethayarajh 2019 defines anisotropy this way).
- Tower gap (SamToNe, Moiseev et al. 2023, t-SNE of drifting towers): distance between the two
  towers' centroids, and how often a query's nearest neighbour is another query rather than a
  document (compared with the rate expected if the towers were indistinguishable).
- Distances from each query to its top-1 document (SamToNe explains its gain from that
  distribution), to its judged positives, and to random documents.

Distances are Euclidean between normalised embeddings: ||q - d|| = sqrt(2 - 2 cos), in [0, 2].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
from scipy.special import hyp0f1, logsumexp


@dataclass
class DiagnosticsArgs:
    alignment_alpha: float = 2.0  # Wang & Isola 2020, Eq. 4 and reference code default
    uniformity_t: float = 2.0  # Wang & Isola 2020, Eq. 5 and reference code default
    random_pairs_per_query: int = 5  # baseline histogram: query vs random documents
    block_size: int = 1024  # rows per block of pairwise products (memory ~ block x n x 8 bytes)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, dim] of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _row_blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(size, 1)):
        yield slice(start, min(start + size, n))


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola Eq. 4: mean over positive pairs (x_i, y_i) of ||f(x_i) - f(y_i)||^alpha."""
    x, y = l2_normalize(x), l2_normalize(y)
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"alignment needs paired rows of equal shape, got {x.shape} and {y.shape}")
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))


def uniformity(x: np.ndarray, t: float = 2.0, block_size: int = 1024) -> float:
    """Wang & Isola Eq. 5: log of the mean over distinct pairs i < j of exp(-t ||f(x_i) - f(x_j)||²).

    0 for a collapsed cloud (every pair at distance 0), more negative as points spread out; see
    `uniformity_on_sphere` for the value of a uniform cloud. Computed blockwise in log space.
    """
    x = l2_normalize(x)
    n = len(x)
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {n}")
    partial = []
    for rows in _row_blocks(n, block_size):
        sq = np.clip(2.0 - 2.0 * (x[rows] @ x.T), 0.0, 4.0)
        upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]
        if upper.any():
            partial.append(logsumexp(-t * sq[upper]))
    n_pairs = n * (n - 1) / 2
    return float(logsumexp(partial) - math.log(n_pairs))


def uniformity_on_sphere(dim: int, t: float = 2.0) -> float:
    """Expected `uniformity` for points drawn uniformly on the unit sphere S^{dim-1} (the limit of
    many points; an isotropic Gaussian, once normalised, is exactly this distribution).

    Derivation: ||x - y||² = 2 - 2u with u = x·y, so E exp(-t||x-y||²) = e^{-2t} E e^{2tu}. The
    density of u on S^{d-1} is proportional to (1 - u²)^{(d-3)/2}; its moment generating function
    is the von Mises-Fisher normaliser E e^{κu} = Γ(d/2) (κ/2)^{1-d/2} I_{d/2-1}(κ), which by the
    series of the Bessel function equals the hypergeometric limit function 0F1(; d/2; κ²/4).
    With κ = 2t:
        uniformity = -2t + log 0F1(; d/2; t²)
    (a series of positive terms, so no Bessel underflow at d = 768). d = 3 gives
    log(sinh(2t) / 2t) - 2t = -2.080 for t = 2; as d grows 0F1 -> 1 (u concentrates at 0,
    pairs at distance sqrt 2) and the value tends to -2t, i.e. -4 for t = 2 (-3.752 at d = 32).
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    return float(-2.0 * t + math.log(hyp0f1(dim / 2.0, t * t)))


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Anisotropy: mean cosine over distinct pairs i != j, exactly, in O(n dim):
    sum_{i != j} x_i·x_j = ||sum_i x_i||² - sum_i ||x_i||² for unit rows."""
    x = l2_normalize(x)
    n = len(x)
    if n < 2:
        raise ValueError(f"anisotropy needs at least 2 embeddings, got {n}")
    total = x.sum(axis=0)
    return float((total @ total - np.sum(x * x)) / (n * (n - 1)))


def _nearest(x: np.ndarray, candidates: np.ndarray, exclude_self: bool,
             block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each row's most similar candidate row (unit rows)."""
    best_idx = np.zeros(len(x), dtype=np.int64)
    best_sim = np.full(len(x), -np.inf)
    for rows in _row_blocks(len(x), block_size):
        sims = x[rows] @ candidates.T
        if exclude_self:
            local = np.arange(rows.stop - rows.start)
            sims[local, local + rows.start] = -np.inf
        best_idx[rows] = sims.argmax(axis=1)
        best_sim[rows] = sims[np.arange(len(sims)), best_idx[rows]]
    return best_idx, best_sim


def same_tower_neighbour_rate(x: np.ndarray, other: np.ndarray,
                              block_size: int = 1024) -> tuple[float, float]:
    """(observed, chance): how often a row's nearest neighbour among x ∪ other (itself excluded)
    is in x, and the rate expected if both sets came from one distribution, (n_x - 1) /
    (n_x - 1 + n_other). An exact tie counts as the other tower."""
    x, other = l2_normalize(x), l2_normalize(other)
    if len(x) < 2 or len(other) < 1:
        raise ValueError("the neighbour rate needs >= 2 rows of one tower and >= 1 of the other")
    _, own = _nearest(x, x, exclude_self=True, block_size=block_size)
    _, cross = _nearest(x, other, exclude_self=False, block_size=block_size)
    chance = (len(x) - 1) / (len(x) - 1 + len(other))
    return float(np.mean(own > cross)), float(chance)


def top1_documents(queries: np.ndarray, docs: np.ndarray, similarity: str = "cos",
                   block_size: int = 1024) -> np.ndarray:
    """Index of each query's top-1 document under the model's own similarity (what retrieval
    returns): cosine, or the raw inner product for models that do not normalise."""
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    q = np.asarray(queries, np.float64)
    d = np.asarray(docs, np.float64)
    if similarity == "cos":
        q, d = l2_normalize(q), l2_normalize(d)
    return _nearest(q, d, exclude_self=False, block_size=block_size)[0]


def pair_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x̂_i - ŷ_i|| for paired rows of normalised embeddings."""
    return np.linalg.norm(l2_normalize(x) - l2_normalize(y), axis=1)


DESCRIPTIONS = {
    "uniformity_query": "Wang & Isola uniformity of the queries (t=2); lower = more spread out",
    "uniformity_doc": "the same for the documents",
    "uniformity_sphere": "reference: points uniform on the sphere of this dimension",
    "anisotropy_query": "mean cosine between two queries (0 = isotropic, 1 = one direction)",
    "anisotropy_doc": "mean cosine between two documents",
    "centroid_distance": "distance between the query and document centroids (tower gap)",
    "query_nn_is_query": "share of queries whose nearest neighbour is another query",
    "query_nn_is_query_chance": "that share if the towers were indistinguishable",
    "doc_nn_is_doc": "share of documents whose nearest neighbour is another document",
    "doc_nn_is_doc_chance": "that share if the towers were indistinguishable",
    "top1_distance_mean": "mean distance from a query to its top-1 document",
    "top1_distance_median": "median of the same",
    "random_distance_mean": "mean distance from a query to a random document",
    "alignment": "Wang & Isola alignment of judged pairs (alpha=2); lower = closer positives",
    "positive_distance_mean": "mean distance from a query to its judged positives",
    "top1_is_positive_rate": "share of queries whose top-1 document is judged relevant",
    "n_positive_pairs": "judged (query, document) pairs in the sample",
}


@dataclass
class Diagnostics:
    """Scalars (see `scalars()`) and the distance samples behind the histograms."""

    n_queries: int
    n_docs: int
    dim: int
    uniformity_query: float
    uniformity_doc: float
    uniformity_sphere: float  # reference value: uniform on the sphere of this dimension
    anisotropy_query: float
    anisotropy_doc: float
    centroid_distance: float
    query_nn_is_query: float
    query_nn_is_query_chance: float
    doc_nn_is_doc: float
    doc_nn_is_doc_chance: float
    top1_distance_mean: float
    top1_distance_median: float
    random_distance_mean: float
    alignment: float | None = None  # None without judged positive pairs in the sample
    positive_distance_mean: float | None = None
    top1_is_positive_rate: float | None = None
    n_positive_pairs: int = 0
    top1_distances: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    top1_is_positive: np.ndarray | None = field(default=None, repr=False)
    positive_distances: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    random_distances: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    ARRAYS = ("top1_distances", "top1_is_positive", "positive_distances", "random_distances")

    def scalars(self) -> dict[str, float]:
        """The numeric summaries (None values left out), e.g. for tensorboard or JSON."""
        return {k: v if isinstance(v, int) else float(v) for k, v in asdict(self).items()
                if k not in self.ARRAYS and v is not None}

    def to_json(self) -> dict:
        out: dict = self.scalars()
        for name in self.ARRAYS:
            value = getattr(self, name)
            out[name] = None if value is None else np.asarray(value).tolist()
        return out


def compute_diagnostics(query_emb: np.ndarray, doc_emb: np.ndarray,
                        positives: Sequence[tuple[int, int]] = (), similarity: str = "cos",
                        args: DiagnosticsArgs | None = None, seed: int = 0) -> Diagnostics:
    """All diagnostics of a sample of queries and documents.

    `positives` are (query row, document row) pairs judged relevant; they give alignment, the
    positive-distance histogram and whether each query's top-1 document is a judged positive.
    `similarity` ("cos" | "dot") is the model's retrieval score, used only to pick the top-1.
    """
    args = args or DiagnosticsArgs()
    q, d = l2_normalize(query_emb), l2_normalize(doc_emb)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"query and document embeddings differ in width: {q.shape} vs {d.shape}")
    if len(q) < 2 or len(d) < 2:
        raise ValueError(f"diagnostics need >= 2 queries and >= 2 documents, got {len(q)}, {len(d)}")
    pos = np.asarray(list(positives), dtype=np.int64).reshape(-1, 2)
    if len(pos) and (pos.min() < 0 or pos[:, 0].max() >= len(q) or pos[:, 1].max() >= len(d)):
        raise ValueError("a positive pair indexes outside the query/document rows")
    top1 = top1_documents(query_emb, doc_emb, similarity, args.block_size)
    top1_dist = pair_distances(q, d[top1])
    rng = np.random.default_rng(seed)
    rand_docs = rng.integers(len(d), size=(len(q), args.random_pairs_per_query))
    rand_dist = pair_distances(np.repeat(q, args.random_pairs_per_query, axis=0),
                               d[rand_docs.ravel()])
    q_rate, q_chance = same_tower_neighbour_rate(q, d, args.block_size)
    d_rate, d_chance = same_tower_neighbour_rate(d, q, args.block_size)
    result = Diagnostics(
        n_queries=len(q), n_docs=len(d), dim=q.shape[1],
        uniformity_query=uniformity(q, args.uniformity_t, args.block_size),
        uniformity_doc=uniformity(d, args.uniformity_t, args.block_size),
        uniformity_sphere=uniformity_on_sphere(q.shape[1], args.uniformity_t),
        anisotropy_query=mean_pairwise_cosine(q), anisotropy_doc=mean_pairwise_cosine(d),
        centroid_distance=float(np.linalg.norm(q.mean(axis=0) - d.mean(axis=0))),
        query_nn_is_query=q_rate, query_nn_is_query_chance=q_chance,
        doc_nn_is_doc=d_rate, doc_nn_is_doc_chance=d_chance,
        top1_distance_mean=float(top1_dist.mean()),
        top1_distance_median=float(np.median(top1_dist)),
        random_distance_mean=float(rand_dist.mean()),
        top1_distances=top1_dist, random_distances=rand_dist, n_positive_pairs=len(pos))
    if len(pos):
        pos_dist = pair_distances(q[pos[:, 0]], d[pos[:, 1]])
        judged = {(int(a), int(b)) for a, b in pos}
        has_positive = np.zeros(len(q), dtype=bool)
        has_positive[pos[:, 0]] = True
        hit = np.array([(i, int(j)) in judged for i, j in enumerate(top1)])
        result.alignment = alignment(q[pos[:, 0]], d[pos[:, 1]], args.alignment_alpha)
        result.positive_distances = pos_dist
        result.positive_distance_mean = float(pos_dist.mean())
        # over the queries that have a judged positive in the sample (others cannot hit)
        result.top1_is_positive = np.where(has_positive, hit, False)
        result.top1_is_positive_rate = float(hit[has_positive].mean())
    return result
