"""Hybrid retrieval (common/eval/fusion.py): the fusion formulas against values ranx printed and
against a slow per-document re-computation; `--system hybrid` end to end."""
from __future__ import annotations

import json
import random

import pytest

from benchmarks.hybrid import acceptance
from tests.test_eval_cli import tiny_model_dir, write_beir  # noqa: F401 (fixture)
from twotower.common.eval.cli import main
from twotower.common.eval.fusion import fuse, rrf, weighted_sum

A = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d1": 1.0, "d4": 0.5}}
B = {"q1": {"d3": 0.9, "d2": 0.8}, "q2": {"d4": 0.7, "d5": 0.1}}


def test_the_same_numbers_as_ranx():
    """ranx 0.3.21: fuse([Run(A), Run(B)], method="rrf", params={"k": 60}) and
    fuse(..., norm="min-max", method="wsum", params={"weights": [0.3, 0.7]}), printed."""
    got = rrf([A, B], k=60)
    want = {"q1": {"d3": 0.032266458495966696, "d2": 0.03225806451612903,
                   "d1": 0.01639344262295082},
            "q2": {"d4": 0.03252247488101534, "d1": 0.01639344262295082,
                   "d5": 0.016129032258064516}}
    assert got.keys() == want.keys()
    for q in want:
        assert got[q] == pytest.approx(want[q], abs=1e-15)
    got = weighted_sum([A, B], [0.3, 0.7])
    want = {"q1": {"d3": 0.7, "d1": 0.3, "d2": 0.15}, "q2": {"d4": 0.7, "d1": 0.3, "d5": 0.0}}
    assert got.keys() == want.keys()
    for q in want:
        assert got[q] == pytest.approx(want[q])


def slow_rrf(runs, k):
    out = {}
    for q in {q for run in runs for q in run}:
        docs = {d for run in runs for d in run.get(q, {})}
        out[q] = {}
        for d in docs:
            total = 0.0
            for run in runs:
                order = sorted(run.get(q, {}).items(), key=lambda x: (-x[1], x[0]))
                ranks = [i + 1 for i, (doc, _) in enumerate(order) if doc == d]
                total += 1.0 / (k + ranks[0]) if ranks else 0.0
            out[q][d] = total
    return out


def test_rrf_and_wsum_against_their_formulas():
    rng = random.Random(0)
    runs = [{f"q{q}": {f"d{rng.randrange(30)}": rng.random() for _ in range(12)}
             for q in range(5)} for _ in range(3)]
    fused = rrf(runs, k=10)
    want = slow_rrf(runs, 10)
    assert fused.keys() == want.keys()
    for q in want:
        assert fused[q] == pytest.approx(want[q])
    weights = [0.2, 0.5, 0.3]
    fused = weighted_sum(runs, weights)
    for q, docs in fused.items():
        for d, score in docs.items():
            expect = 0.0
            for run, w in zip(runs, weights):
                scores = run[q]
                if d in scores:
                    lo, hi = min(scores.values()), max(scores.values())
                    expect += w * (scores[d] - lo) / (hi - lo)
            assert score == pytest.approx(expect)


def test_fuse_keeps_the_top_depth_and_checks_its_arguments():
    fused = fuse(A, B, "wsum", dense_weight=0.7, depth=2)
    assert fused["q1"] == pytest.approx({"d3": 0.7, "d1": 0.3})
    assert fuse(A, B, "wsum", dense_weight=0.0)["q1"] == pytest.approx(
        {"d1": 1.0, "d2": 0.5, "d3": 0.0})  # weight 0: BM25's order alone
    with pytest.raises(ValueError, match="dense weight"):
        fuse(A, B, "wsum", dense_weight=1.5)
    with pytest.raises(ValueError, match="fusion must be"):
        fuse(A, B, "max")


def test_hybrid_from_the_command_line(tmp_path, tiny_model_dir):  # noqa: F811
    data = write_beir(tmp_path / "beir")
    base = ["--data", str(data), "--split", "test", "--no-progress", "--model", str(tiny_model_dir)]
    assert main([*base, "--system", "hybrid", "--output-dir", str(tmp_path / "rrf")]) == 0
    assert main([*base, "--system", "hybrid", "--fusion", "wsum", "--dense-weight", "0",
                 "--output-dir", str(tmp_path / "w0")]) == 0
    assert main(["--data", str(data), "--split", "test", "--no-progress", "--system", "bm25",
                 "--output-dir", str(tmp_path / "bm25")]) == 0
    rrf_out = json.loads((tmp_path / "rrf" / "metrics.json").read_text())
    assert rrf_out["system"] == "hybrid" and rrf_out["fusion"] == {"method": "rrf", "rrf_k": 60}
    assert set(rrf_out["parts"]) == {"bm25", "dense"}
    bm25 = json.loads((tmp_path / "bm25" / "metrics.json").read_text())
    assert rrf_out["parts"]["bm25"] == bm25["metrics"]
    w0 = json.loads((tmp_path / "w0" / "metrics.json").read_text())
    assert w0["metrics"] == pytest.approx(bm25["metrics"])  # all weight on BM25: BM25's ranking
    for wrong in (["--fusion", "wsum"], ["--system", "hybrid", "--rrf-k", "5", "--fusion", "wsum"],
                  ["--system", "hybrid", "--fusion", "wsum", "--dense-weight", "2"]):
        with pytest.raises(SystemExit):
            main([*base, *wrong, "--output-dir", str(tmp_path / "x")])


def test_hybrid_benchmark_checks_its_scifact_rows_against_the_reference_figures():
    """benchmarks/hybrid.py is also the evaluation's acceptance check: a SciFact test figure
    outside its tolerance is flagged (and the command exits 1)."""
    rows = [{"system": "bm25", "nDCG@10": 0.6863, "R@100": 0.9127},
            {"system": "dense", "nDCG@10": 0.6451, "R@100": 0.9250}]
    result = {"model": "bundled:all-MiniLM-L6-v2", "test": {"SciFact test": rows}}
    assert len(acceptance(result)) == 4 and all(l.endswith("within") for l in acceptance(result))
    rows[1]["nDCG@10"] = 0.640  # 0.005 below 0.645, tolerance 0.002
    assert [l for l in acceptance(result) if l.endswith("**outside**")] == [
        "dense nDCG@10 0.6400 vs reference 0.645 ± 0.002: **outside**"]
    assert acceptance({**result, "model": "another"}) == []  # the figures are the bundled model's
