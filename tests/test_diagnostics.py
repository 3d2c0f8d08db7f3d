"""Embedding-space diagnostics (common/report/diagnostics.py) on synthetic embeddings with known answers."""
import itertools
import math

import numpy as np
import pytest
from scipy import integrate

from twotower.common.report.diagnostics import (alignment, compute_diagnostics,
                                                mean_pairwise_cosine, same_tower_neighbour_rate,
                                                top1_documents, uniformity, uniformity_on_sphere)


def unit(x):
    x = np.asarray(x, float)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gaussian(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


# ----------------------------------------------------------------- uniformity (Wang & Isola Eq. 5)
def test_uniformity_equals_the_pairwise_formula_computed_by_a_loop():
    x = gaussian(9, 5, seed=1) * np.arange(1, 10)[:, None]  # row scales must not matter
    t = 2.0
    terms = [math.exp(-t * float(np.sum((unit(x[i]) - unit(x[j])) ** 2)))
             for i, j in itertools.combinations(range(len(x)), 2)]
    expected = math.log(sum(terms) / len(terms))
    assert uniformity(x, t=t) == pytest.approx(expected, rel=1e-10)
    assert uniformity(x, t=t, block_size=2) == pytest.approx(expected, rel=1e-10)  # blockwise
    assert uniformity(x, t=0.5) != pytest.approx(expected, rel=1e-3)


def test_analytic_uniformity_matches_numerical_integration_over_the_cosine_density():
    # independent check of the 0F1 closed form: integrate e^{-t(2-2u)} against the density of
    # u = x.y on S^{d-1}, proportional to (1 - u^2)^{(d-3)/2}
    for d, t in ((3, 2.0), (8, 2.0), (32, 2.0), (100, 1.0)):
        weight = lambda u: (1 - u * u) ** ((d - 3) / 2)  # noqa: E731
        norm = integrate.quad(weight, -1, 1)[0]
        mean = integrate.quad(lambda u: math.exp(-t * (2 - 2 * u)) * weight(u), -1, 1)[0] / norm
        assert uniformity_on_sphere(d, t) == pytest.approx(math.log(mean), abs=1e-8), d


def test_analytic_uniformity_known_values():
    # d = 3: u is uniform on [-1, 1], so E e^{4u} = sinh(4) / 4
    assert uniformity_on_sphere(3) == pytest.approx(math.log(math.sinh(4) / 4) - 4, abs=1e-12)
    # large d: pairs concentrate at distance sqrt(2), value -> -2t = -4 from above
    values = [uniformity_on_sphere(d) for d in (8, 32, 128, 768, 4096)]
    assert all(a < b for a, b in zip(values[1:], values))  # decreasing towards -4
    assert values[-1] == pytest.approx(-4.0, abs=0.003)
    assert uniformity_on_sphere(768) > -4.0


@pytest.mark.parametrize("dim", [3, 32, 256])
def test_isotropic_gaussian_reaches_the_analytic_uniformity(dim):
    # A normalised isotropic Gaussian is uniform on the sphere. On the sphere the estimator's
    # first-order (Hoeffding) term is constant, so its error shrinks like 1/n, not 1/sqrt(n):
    # with n = 1000 the deviation is ~1e-3; 0.02 leaves room while d = 3, 32 and 256 (-2.08,
    # -3.75, -3.97) stay distinguishable.
    x = gaussian(1000, dim, seed=dim)
    assert uniformity(x) == pytest.approx(uniformity_on_sphere(dim), abs=0.02)


def test_collapsed_and_clustered_clouds_are_less_uniform():
    direction = gaussian(1, 16)
    collapsed = np.repeat(direction, 50, axis=0) * np.linspace(1, 5, 50)[:, None]
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-9)
    spread = uniformity(gaussian(300, 16))
    clustered = uniformity(direction * 3 + gaussian(300, 16, seed=3) * 0.3)
    assert spread < clustered < 0


# ------------------------------------------------------------------ alignment (Wang & Isola Eq. 4)
def test_alignment_equals_the_formula_computed_by_a_loop():
    x, y = gaussian(7, 6, seed=1), gaussian(7, 6, seed=2)
    for alpha in (2.0, 1.0):
        expected = sum(float(np.linalg.norm(unit(a) - unit(b))) ** alpha for a, b in zip(x, y)) / 7
        assert alignment(x, y, alpha) == pytest.approx(expected, rel=1e-12)


def test_alignment_of_identical_and_independent_pairs():
    x = gaussian(2000, 16)
    assert alignment(x, 3.0 * x) == pytest.approx(0.0, abs=1e-12)
    # independent uniform pairs: E||x - y||^2 = 2 - 2 E[x.y] = 2; the sd of the mean over 2000
    # pairs is sqrt(4 Var(x.y) / 2000) = sqrt(4 / 16 / 2000) ~ 0.011
    assert alignment(x, gaussian(2000, 16, seed=9)) == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="paired rows"):
        alignment(x, x[:5])


# ------------------------------------------------------------------------------ anisotropy
def test_anisotropy_closed_form_equals_the_mean_over_pairs():
    x = gaussian(8, 4, seed=5) + 0.5
    pairs = [float(unit(x[i]) @ unit(x[j])) for i in range(8) for j in range(8) if i != j]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)


def test_anisotropy_of_isotropic_shifted_and_collapsed_clouds():
    assert mean_pairwise_cosine(gaussian(1000, 64)) == pytest.approx(0.0, abs=0.01)
    # x = mu + eps, |mu| = m, eps ~ N(0, I_d): for large d, |x|^2 concentrates at m^2 + d and
    # E[x_i.x_j] = m^2, so the mean cosine is m^2 / (m^2 + d) = 256 / 512 = 0.5 for m = 16, d = 256
    mu = np.zeros(256)
    mu[0] = 16.0
    assert mean_pairwise_cosine(mu + gaussian(500, 256, seed=2)) == pytest.approx(0.5, abs=0.02)
    assert mean_pairwise_cosine(np.ones((10, 3))) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- tower gap
def test_neighbour_rate_equals_a_direct_loop():
    q, d = gaussian(12, 3, seed=1), gaussian(9, 3, seed=2)
    hits = 0
    for i in range(12):
        own = max(float(unit(q[i]) @ unit(q[j])) for j in range(12) if j != i)
        cross = max(float(unit(q[i]) @ unit(doc)) for doc in d)
        hits += own > cross
    rate, chance = same_tower_neighbour_rate(q, d, block_size=5)
    assert rate == pytest.approx(hits / 12)
    assert chance == pytest.approx(11 / 20)


def test_identical_towers_have_no_gap():
    x = gaussian(200, 32)
    diag = compute_diagnostics(x, x.copy())
    assert diag.centroid_distance == pytest.approx(0.0, abs=1e-12)
    assert diag.query_nn_is_query == 0.0  # each query's nearest point is its own document
    assert diag.doc_nn_is_doc == 0.0
    # towers drawn from one distribution (different samples): the rate is the chance rate,
    # within 4 binomial standard errors
    rate, chance = same_tower_neighbour_rate(gaussian(400, 32, seed=1), gaussian(400, 32, seed=2))
    assert abs(rate - chance) < 4 * math.sqrt(chance * (1 - chance) / 400)


def test_separated_towers_have_a_gap():
    e1, e2 = np.eye(32)[0], np.eye(32)[1]
    q = e1 + 0.01 * gaussian(100, 32, seed=1)
    d = e2 + 0.01 * gaussian(150, 32, seed=2)
    diag = compute_diagnostics(q, d)
    assert diag.centroid_distance == pytest.approx(math.sqrt(2), abs=0.01)  # |e1 - e2|
    assert diag.query_nn_is_query == 1.0
    assert diag.doc_nn_is_doc == 1.0
    assert diag.query_nn_is_query_chance == pytest.approx(99 / 249)


# ------------------------------------------------------------------------- top-1 distances
def test_top1_follows_the_model_similarity():
    q = np.array([[1.0, 0.0]])
    d = np.array([[0.6, 0.8], [10.0, 10.0], [1.0, 0.1]])
    assert top1_documents(q, d, "dot").tolist() == [1]  # long vector wins the inner product
    assert top1_documents(q, d, "cos").tolist() == [2]  # smallest angle wins the cosine
    with pytest.raises(ValueError, match="similarity"):
        top1_documents(q, d, "l2")
    qs, ds = gaussian(30, 8, seed=1), gaussian(40, 8, seed=2)
    brute = [int(np.argmax([unit(a) @ unit(b) for b in ds])) for a in qs]
    assert top1_documents(qs, ds, "cos", block_size=7).tolist() == brute


def test_diagnostics_with_positive_pairs():
    rng = np.random.default_rng(0)
    q = gaussian(50, 32)
    docs = np.concatenate([q + 0.1 * rng.normal(size=q.shape), gaussian(30, 32, seed=4)])
    positives = [(i, i) for i in range(50)]
    diag = compute_diagnostics(q, docs, positives)
    expected_dist = np.linalg.norm(unit(q) - unit(docs[:50]), axis=1)
    assert diag.alignment == pytest.approx(np.mean(expected_dist ** 2))
    assert diag.positive_distance_mean == pytest.approx(expected_dist.mean())
    assert diag.top1_is_positive_rate == 1.0  # each query's noisy copy is nearest
    assert np.allclose(diag.top1_distances, expected_dist)
    assert diag.random_distance_mean > 1.0 > diag.top1_distance_mean
    assert diag.uniformity_sphere == pytest.approx(uniformity_on_sphere(32))
    scalars = diag.scalars()
    assert "top1_distances" not in scalars and scalars["n_positive_pairs"] == 50
    no_pos = compute_diagnostics(q, docs)
    assert no_pos.alignment is None and "alignment" not in no_pos.scalars()


def test_bad_inputs_are_refused():
    q, d = gaussian(5, 4), gaussian(6, 4)
    with pytest.raises(ValueError, match="outside"):
        compute_diagnostics(q, d, [(0, 6)])
    with pytest.raises(ValueError, match="width"):
        compute_diagnostics(q, gaussian(6, 5))
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(q[:1])
    with pytest.raises(ValueError, match="2-D"):
        uniformity(np.zeros(5))
