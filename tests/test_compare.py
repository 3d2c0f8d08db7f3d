"""Paired significance (common/eval/significance.py) and run comparison (common/report/compare.py)."""
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from tests.fixtures_data import write_jsonl, write_text
from twotower.common.data import write_run
from twotower.common.eval.evaluate import evaluate_bm25, load_eval_data
from twotower.common.eval.metrics import per_query
from twotower.common.eval.outputs import write_outputs
from twotower.common.eval.significance import (SignificanceArgs, compare_paired, paired_t_test,
                                               randomization_test)
from twotower.common.report.compare import (QrelsSource, build_comparison, discover, main,
                                            parse_run_spec, render_markdown)


# ------------------------------------------------------------------------- significance
def test_identical_scores_give_p_one():
    a = np.random.default_rng(0).random(40)
    assert paired_t_test(a, a.copy()) == 1.0  # scipy alone gives nan here
    assert randomization_test(a, a.copy()) == 1.0
    assert randomization_test(a[:8], a[:8].copy()) == 1.0  # exact enumeration path
    result = compare_paired({f"q{i}": v for i, v in enumerate(a)},
                            {f"q{i}": v for i, v in enumerate(a)})
    assert (result.p_ttest, result.p_randomization, result.difference) == (1.0, 1.0, 0.0)


def test_t_test_equals_the_textbook_formula():
    rng = np.random.default_rng(1)
    a = rng.random(25)
    b = a + rng.normal(0.05, 0.1, 25)
    d = b - a
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    expected = 2 * stats.t.sf(abs(t), df=len(d) - 1)
    assert paired_t_test(a, b) == pytest.approx(expected, rel=1e-10)
    assert paired_t_test(b, a) == pytest.approx(expected, rel=1e-10)  # two-sided
    quarters = np.arange(10) / 4  # exact binary fractions: the shift is exactly constant
    assert paired_t_test(quarters, quarters + 0.25) == 0.0  # constant non-zero shift: t = inf


def exact_sign_flip_p(a, b):
    """Slow reference: every sign vector, by loops."""
    diffs = [y - x for x, y in zip(a, b)]
    observed = abs(sum(diffs) / len(diffs))
    extreme = total = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        total += 1
        extreme += abs(sum(s * v for s, v in zip(signs, diffs)) / len(diffs)) >= observed - 1e-12
    return extreme / total


def test_randomisation_test_matches_full_enumeration():
    rng = np.random.default_rng(2)
    a = rng.random(12)
    b = a + rng.normal(0.08, 0.15, 12)
    exact = exact_sign_flip_p(a, b)
    assert 0.001 < exact < 0.5  # an informative case, neither trivial nor certain
    assert randomization_test(a, b) == pytest.approx(exact, abs=1e-12)  # 2^12 <= 10000: exact
    sampled = randomization_test(a, b, n_permutations=10000, seed=0, exact=False)
    # Monte-Carlo estimate within 4 binomial standard errors of the exact value
    assert abs(sampled - exact) < 4 * math.sqrt(exact * (1 - exact) / 10000) + 1e-4
    assert sampled == randomization_test(a, b, n_permutations=10000, seed=0, exact=False)


def test_randomisation_p_for_a_constant_shift_is_bounded_below():
    a = np.zeros(30)
    # only the two all-equal sign vectors reach |mean| = 0.1; the sampled p counts the observed
    # assignment, so it is (1 + k) / 10001 with k tiny (expected 2 * 10000 / 2^30)
    p = randomization_test(a, a + 0.1, n_permutations=10000, seed=0)
    assert p == pytest.approx(1 / 10001)


def test_paired_tests_need_the_same_queries():
    with pytest.raises(ValueError, match="same queries.*1 only in base"):
        compare_paired({"q1": 1.0, "q2": 0.0}, {"q1": 1.0}, names=("base", "new"))


# ---------------------------------------------------------------------------- comparison
N_QUERIES = 30


def synthetic_qrels(tmp_path):
    lines = "".join(f"q{i} 0 d{i} 1\n" for i in range(N_QUERIES))
    return write_text(tmp_path / "qrels.txt", lines)


def ranking_run(path, rank_of_relevant, tag="sys"):
    """A TREC run where query i's relevant document d_i sits at rank_of_relevant[i]."""
    run = {}
    for i, rank in enumerate(rank_of_relevant):
        docs = [f"x{i}_{j}" for j in range(10)]
        docs.insert(rank - 1, f"d{i}")
        run[f"q{i}"] = {doc: 100.0 - r for r, doc in enumerate(docs)}
    return write_run(run, path, tag=tag)


def test_compare_trec_runs_marks_significant_gains(tmp_path):
    qrels = synthetic_qrels(tmp_path)
    rng = np.random.default_rng(0)
    base = ranking_run(tmp_path / "base.trec", rng.integers(2, 8, N_QUERIES))
    better = ranking_run(tmp_path / "better.trec", [1] * N_QUERIES)
    entries = [e for spec in (f"base={base}", f"better={better}", f"copy={base}")
               for e in discover(*parse_run_spec(spec))]
    comp = build_comparison(entries, ["nDCG@10", "MRR@10"], QrelsSource(qrels_file=str(qrels)),
                            significance=SignificanceArgs(n_permutations=2000))
    from twotower.common.data import load_qrels, load_run

    expected = per_query(load_qrels(qrels), load_run(base), ["nDCG@10"])["nDCG@10"]
    dataset = comp.datasets[0]
    assert comp.values["base"][dataset]["nDCG@10"] == pytest.approx(np.mean(list(expected.values())))
    assert comp.values["better"][dataset]["MRR@10"] == 1.0
    test = comp.tests["better"][dataset]["nDCG@10"]
    assert test.p_ttest < 1e-6 and test.p_randomization < 0.01
    assert comp.marks("better", dataset, "nDCG@10") == "*†"
    copy = comp.tests["copy"][dataset]["MRR@10"]
    assert (copy.p_ttest, copy.p_randomization) == (1.0, 1.0)
    assert comp.marks("copy", dataset, "MRR@10") == ""
    table = render_markdown(comp)
    assert "| base (baseline) |" in table and "\\*†" in table
    assert "| copy |" in table and f"{comp.values['copy'][dataset]['MRR@10']:.4f} |" in table


def test_trec_run_without_qrels_is_an_error(tmp_path):
    run = ranking_run(tmp_path / "a.trec", [1] * N_QUERIES)
    with pytest.raises(ValueError, match=r"a\.trec is a TREC run file: pass --qrels"):
        build_comparison(discover("a", run) + discover("b", run))


def beir_folder(root, n=10, relevant_word=0):
    words = ["apple", "river", "cloud", "stone", "music", "tiger", "paper", "glass", "honey",
             "laser", "mango", "orbit", "pearl", "quilt", "radar", "sugar", "tulip", "umbra",
             "vapor", "wheat"]
    write_jsonl(root / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"{w} facts"}
                                        for i, w in enumerate(words)])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"about {words[i]}"}
                                         for i in range(n)])
    write_text(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n"
               + "".join(f"q{i}\td{i + relevant_word}\t1\n" for i in range(n)))
    return root


def eval_dir(data_root, out):
    data = load_eval_data(str(data_root), "test")
    result = evaluate_bm25(data, k=10)
    write_outputs(result, out, extra={"data_path": str(data_root)})
    return out


def test_compare_evaluation_folders_across_datasets_with_average(tmp_path):
    easy = beir_folder(tmp_path / "data" / "easy")  # query words match the relevant document
    hard = beir_folder(tmp_path / "data" / "hard", relevant_word=1)  # they never do
    for name, root in (("easy", easy), ("hard", hard)):
        eval_dir(root, tmp_path / "bm25" / name)
    # a second "system": a TREC run of a perfect ranker on `hard` only, in its own folder
    perfect = tmp_path / "perfect" / "hard"
    perfect.mkdir(parents=True)
    write_run({f"q{i}": {f"d{i + 1}": 1.0} for i in range(10)}, perfect / "run.trec")
    (perfect / "metrics.json").write_text(json.dumps({"metrics": {}, "data": "hard",
                                                      "split": "test", "data_path": str(hard)}))
    metrics_only = tmp_path / "reported" / "easy"
    metrics_only.mkdir(parents=True)
    (metrics_only / "metrics.json").write_text(json.dumps(
        {"metrics": {"nDCG@10": 0.5}, "data": "easy", "split": "test"}))
    out = tmp_path / "cmp"
    assert main([f"bm25={tmp_path / 'bm25'}", f"perfect={tmp_path / 'perfect'}",
                 f"paper={tmp_path / 'reported'}", "--metrics", "nDCG@10",
                 "--permutations", "500", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "compare.json").read_text())
    bm25_easy = saved["values"]["bm25"]["easy/test"]["nDCG@10"]
    bm25_hard = saved["values"]["bm25"]["hard/test"]["nDCG@10"]
    stored = json.loads((tmp_path / "bm25" / "easy" / "metrics.json").read_text())
    assert bm25_easy == pytest.approx(stored["metrics"]["nDCG@10"])
    assert bm25_easy > 0.9 and bm25_hard < 0.1
    assert saved["values"]["perfect"]["hard/test"]["nDCG@10"] == 1.0
    assert saved["values"]["paper"]["easy/test"]["nDCG@10"] == 0.5  # from metrics.json alone
    # no dataset is shared by all three runs: no average
    assert saved["average"]["bm25"]["nDCG@10"] is None
    assert set(saved["tests"]["perfect"]) == {"hard/test"}  # paired where both have run.trec
    assert saved["tests"]["paper"] == {}
    assert saved["tests"]["perfect"]["hard/test"]["nDCG@10"]["p_ttest"] < 0.05
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "compare.md").read_text()
    assert "| paper | – | 0.5000 |" in md or "| paper | 0.5000 | – |" in md

    # two runs on both datasets: the average column is the mean of the dataset means
    comp = build_comparison(discover("a", tmp_path / "bm25") + discover("b", tmp_path / "bm25"),
                            ["nDCG@10"])
    assert comp.average("a", "nDCG@10") == pytest.approx((bm25_easy + bm25_hard) / 2)
    assert "| average |" in render_markdown(comp)

    with pytest.raises(ValueError, match="several datasets"):
        build_comparison(discover("a", tmp_path / "bm25") + discover("b", tmp_path / "bm25"),
                         ["nDCG@10"], QrelsSource(data=str(easy)))
