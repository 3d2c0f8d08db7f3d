"""benchmarks/quality_report.py: a row with a `base` is compared with that row on its own held-out
queries (not the test split), by the same paired test as everything else; the tables keep the
test-split rows apart from the ablation and other-corpus rows."""
import json
import math

import pytest

from benchmarks.quality_report import markdown, seed_means, significance
from tests.test_finetune_mine import TOPICS, write_beir
from twotower.common.data import write_run
from twotower.common.eval.significance import compare_paired


def test_rows_with_a_base_are_compared_on_their_own_queries(tmp_path):
    write_beir(tmp_path / "beir")  # train qrels: q_t -> topic0 (1), topic1 (2), topic2 (0)
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\tmangrove0\t1\n")
    held_out = ["q1", "q2", "q3"]  # a dev split: three of the five training queries
    good = {q: {f"{TOPICS[int(q[1])]}1": 2.0, f"{TOPICS[int(q[1])]}5": 1.0} for q in held_out}
    poor = {q: {f"{TOPICS[int(q[1])]}5": 2.0, f"{TOPICS[int(q[1])]}1": 1.0} for q in held_out}
    poor["q3"] = good["q3"]
    files = {}
    for name, run in (("base", good), ("change", poor)):
        files[name] = str(write_run(run, tmp_path / f"{name}.trec"))
    rows = {"ablation, x: base": {"run_file": files["base"], "qrels": [str(tmp_path / "beir"), "train"]},
            "ablation, x: change": {"run_file": files["change"], "base": "ablation, x: base",
                                    "qrels": [str(tmp_path / "beir"), "train"], "nDCG@10": 0.5}}
    rows["BM25"] = {"run_file": files["base"]}  # a test-split reference row
    significance(rows, str(tmp_path / "beir"))
    row = rows["ablation, x: change"]
    # by hand (trec_eval's gain = grade): the grade-2 document at rank 1 or 2, no other relevant
    # one retrieved; the ideal ranking has the grade-2 and the grade-1 document on top
    ideal = 2.0 + 1.0 / math.log2(3)
    at1, at2 = 2.0 / ideal, 2.0 / math.log2(3) / ideal
    want = compare_paired({"q1": at2, "q2": at2, "q3": at1}, {q: at1 for q in held_out})
    assert row["delta_vs_base"] == pytest.approx(round(want.mean_a - want.mean_b, 4))
    assert row["p_vs_base"] == pytest.approx(round(want.p_randomization, 4))
    assert "p_vs_BM25" not in row  # a dev-split row is not compared on the test split
    plain = {"change": {"run_file": files["change"]}, "BM25": rows["BM25"]}
    significance(plain, str(tmp_path / "beir"))
    assert "p_vs_BM25" in plain["change"]  # the same run file, without `qrels`: it would be
    table = markdown(rows)
    assert "## Ablation" in table and "| x: change | 0.5000 |" in table
    assert table.index("| x: change") > table.index("## Ablation")
    # a re-run of the row (a new row: its run file, no per-query scores yet) ranking other queries
    rows["ablation, x: change"] = {**rows["ablation, x: change"],
                                   "run_file": str(write_run({"q1": good["q1"]}, tmp_path / "o.trec"))}
    del rows["ablation, x: change"]["per_query"]
    with pytest.raises(SystemExit, match="different queries"):
        significance(rows, str(tmp_path / "beir"))


def test_rows_of_several_seeds_are_summarised_by_their_mean(tmp_path):
    """Rows sharing a `group` (one per seed): mean and spread, and the p-values of the per-query
    nDCG@10 averaged over the seeds, against a plain reference row and against a reference that
    is a group itself (averaged the same way)."""
    write_beir(tmp_path / "beir")
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{t}\t{topic}0\t1\n" for t, topic in enumerate(TOPICS)))
    rank_of = {"a0": [1, 2, 1, 3, 1], "a1": [2, 1, 1, 1, 4], "f0": [3, 3, 2, 1, 2],
               "f1": [1, 4, 4, 2, 2], "bm25": [5, 1, 2, 2, 3]}
    rows = {}
    for name, ranks in rank_of.items():  # the relevant document of query t at rank ranks[t]
        run = {f"q{t}": {f"{topic}{i}": 10.0 - i for i in range(1, 6)} for t, topic in enumerate(TOPICS)}
        for t, topic in enumerate(TOPICS):
            run[f"q{t}"][f"{topic}0"] = 10.0 - ranks[t] + 0.5  # ties broken above the next one
        path = write_run(run, tmp_path / f"{name}.trec")
        gains = [1.0 / math.log2(r + 1) for r in ranks]
        rows[name] = {"run_file": str(path), "nDCG@10": sum(gains) / len(gains), "R@100": 1.0,
                      "wall_s": 10.0 + len(rows), "gains": gains}
    rows = {"BM25": rows["bm25"],
            "fewshot (seed 0)": {**rows["f0"], "group": "fewshot", "seed": 0},
            "fewshot (seed 1)": {**rows["f1"], "group": "fewshot", "seed": 1},
            "other (seed 4)": {**rows["a0"], "group": "other", "seed": 4},
            "other (seed 2)": {**rows["a1"], "group": "other", "seed": 2}}
    means = seed_means(rows, str(tmp_path / "beir"))
    other = means["other"]
    assert other["seeds"] == [2, 4]
    a = [(x + y) / 2 for x, y in zip(rows["other (seed 4)"]["gains"], rows["other (seed 2)"]["gains"])]
    f = [(x + y) / 2 for x, y in zip(rows["fewshot (seed 0)"]["gains"], rows["fewshot (seed 1)"]["gains"])]
    assert other["nDCG@10"] == pytest.approx(round(sum(a) / 5, 4))
    runs = [rows["other (seed 2)"]["nDCG@10"], rows["other (seed 4)"]["nDCG@10"]]
    assert other["nDCG@10_sd"] == pytest.approx(round(abs(runs[0] - runs[1]) / math.sqrt(2), 4))
    assert other["wall_s"] == pytest.approx((10.0 + 11.0) / 2)  # a0 and a1 were rows 0 and 1
    qids = [f"q{t}" for t in range(5)]
    want_bm25 = compare_paired(dict(zip(qids, a)), dict(zip(qids, rows["BM25"]["gains"])))
    want_fewshot = compare_paired(dict(zip(qids, a)), dict(zip(qids, f)))
    assert other["p_vs_BM25"] == pytest.approx(round(want_bm25.p_randomization, 4))
    assert other["p_vs_fewshot_(seed_0)"] == pytest.approx(round(want_fewshot.p_randomization, 4))
    assert "p_vs_fewshot_(seed_0)" not in means["fewshot"]  # not against itself
    assert "## Mean over seeds" in markdown(rows, means) and "| other | 2, 4 |" in markdown(rows, means)
    # a fresh checkout: quality.json without runs/. Each row keeps its per-query scores, so every
    # p-value is computed again from the record alone
    for name in rank_of:
        (tmp_path / f"{name}.trec").unlink()
    recorded = json.loads(json.dumps(rows))
    again = seed_means(recorded, str(tmp_path / "beir"))["other"]
    assert {k: v for k, v in again.items() if k.startswith("p_")} == {
        k: v for k, v in other.items() if k.startswith("p_")}
    # rows recorded before they kept per-query scores: a mean's recorded p-values stand if they
    # compared these very runs; without the record they are gone, and a re-run row (its
    # nDCG@10 changed) voids the p-values it entered until they can be computed again
    for row in rows.values():
        del row["per_query"]
    assert "p_vs_BM25" not in seed_means(rows, str(tmp_path / "beir"))["other"]
    kept = seed_means(rows, str(tmp_path / "beir"), means)["other"]
    assert kept["p_vs_BM25"] == other["p_vs_BM25"]
    assert kept["p_vs_fewshot_(seed_0)"] == other["p_vs_fewshot_(seed_0)"]
    again = seed_means(rows, str(tmp_path / "beir"), {"other": kept})["other"]
    assert again["p_vs_BM25"] == other["p_vs_BM25"]  # and stand through later writes
    rows["fewshot (seed 1)"] = {**rows["fewshot (seed 1)"], "nDCG@10": 0.1}  # re-run, worse
    voided = seed_means(rows, str(tmp_path / "beir"), means)["other"]
    assert voided["p_vs_BM25"] == other["p_vs_BM25"] and "p_vs_fewshot_(seed_0)" not in voided


def test_ablation_rows_of_several_seeds_are_compared_with_their_base_over_the_same_seeds(tmp_path):
    """An ablation group (rows with `qrels` and a `base`, one per seed): its per-query nDCG@10
    averaged over the seeds against the base group's, averaged over the same seeds, on the
    dev queries; a group of one seed, or one whose base lacks a seed, gets no mean p-value."""
    write_beir(tmp_path / "beir")  # train qrels: q_t -> topic0 (1), topic1 (2), topic2 (0)
    held_out = ["q1", "q2", "q3"]
    ideal = 2.0 + 1.0 / math.log2(3)
    # the grade-2 document of each held-out query at these ranks, no other judged one retrieved
    rank_of = {("base", 42): [1, 2, 1], ("base", 1): [2, 1, 3], ("change", 42): [3, 1, 2],
               ("change", 1): [4, 2, 2], ("lonely", 42): [1, 1, 1], ("partial", 7): [1, 1, 1]}
    qrels = [str(tmp_path / "beir"), "train"]
    rows, gains = {}, {}
    for (name, seed), ranks in rank_of.items():
        run = {}
        for q, r in zip(held_out, ranks):
            topic = TOPICS[int(q[1])]
            run[q] = {f"{topic}{i}": 12.0 - i for i in range(3, 8)}  # 9, 8, ..., 5
            run[q][f"{topic}1"] = 10.0 - r + 0.5
        gains[name, seed] = [2.0 / math.log2(r + 1) / ideal for r in ranks]
        key = f"ablation, x: {name}" + ("" if seed == 42 else f" (seed {seed})")
        rows[key] = {"run_file": str(write_run(run, tmp_path / f"{name}{seed}.trec")),
                     "qrels": qrels, "group": f"ablation, x: {name}", "seed": seed,
                     "nDCG@10": sum(gains[name, seed]) / 3, "wall_s": 5.0}
        if name != "base":
            rows[key]["base"] = "ablation, x: base" + ("" if seed in (42, 7) else f" (seed {seed})")
    means = seed_means(rows, str(tmp_path / "beir"))
    # one seed each: lonely and partial have no mean row
    assert set(means) == {"ablation, x: base", "ablation, x: change"}
    change = means["ablation, x: change"]
    assert change["seeds"] == [1, 42] and change["base"] == "ablation, x: base"
    mine = {q: (a + b) / 2 for q, a, b in zip(held_out, gains["change", 42], gains["change", 1])}
    theirs = {q: (a + b) / 2 for q, a, b in zip(held_out, gains["base", 42], gains["base", 1])}
    want = compare_paired(mine, theirs)
    assert change["delta_vs_base"] == pytest.approx(round(want.mean_a - want.mean_b, 4))
    assert change["p_vs_base"] == pytest.approx(round(want.p_randomization, 4))
    assert change["nDCG@10"] == pytest.approx(round(sum(mine.values()) / 3, 4))
    assert "p_vs_base" not in means["ablation, x: base"] and "p_vs_BM25" not in change
    rows["ablation, x: base (seed 1)"]["seed"] = 3  # the base now lacks seed 1
    assert "p_vs_base" not in seed_means(rows, str(tmp_path / "beir"))["ablation, x: change"]
    table = markdown(rows, means)
    assert "## Ablation, mean over seeds (dev split)" in table
    assert "## Mean over seeds (test split)" not in table
    assert f"| x: change | 1, 42 | {change['nDCG@10']:.4f} |" in table
