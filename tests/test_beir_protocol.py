"""BEIR's own protocol, checked against the `beir` package itself: the toolkit reads a BEIR folder
as `GenericDataLoader` does, and its metrics equal `EvaluateRetrieval.evaluate`'s, with BEIR's
`ignore_identical_ids` (a retrieved document with the query's own id is not scored) on by default
and off on request. BEIR rounds its averages to 5 decimals, hence the 5e-6 tolerance."""
from __future__ import annotations

import copy
import json

import pytest
from beir.datasets.data_loader import GenericDataLoader
from beir.retrieval.evaluation import EvaluateRetrieval

from twotower.common.data import column
from twotower.common.eval.cli import main
from twotower.common.eval.evaluate import evaluate_bm25, load_eval_data

MEASURES = ["nDCG@10", "nDCG@100", "AP@100", "R@10", "R@100", "P@10"]
BEIR_NAMES = {"nDCG@10": "NDCG@10", "nDCG@100": "NDCG@100", "MAP@100": "MAP@100",
              "R@10": "Recall@10", "R@100": "Recall@100", "P@10": "P@10"}


def beir_metrics(qrels, run, ignore_identical_ids: bool) -> dict[str, float]:
    found: dict[str, float] = {}
    for part in EvaluateRetrieval.evaluate(qrels, copy.deepcopy(run), [10, 100],
                                           ignore_identical_ids=ignore_identical_ids):
        found.update(part)
    return {ours: found[theirs] for ours, theirs in BEIR_NAMES.items()}


def assert_same(ours: dict[str, float], theirs: dict[str, float]) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=5e-6), name


@pytest.fixture
def scifact(shared_data_root):
    return shared_data_root / "scifact"


def test_the_loader_reads_a_beir_folder_as_beir_does(scifact):
    corpus, queries, qrels = GenericDataLoader(str(scifact)).load(split="test")
    data = load_eval_data(str(scifact), "test")
    ours = {d: {"title": t, "text": x} for d, t, x in zip(
        column(data.corpus, "id"), column(data.corpus, "title"), column(data.corpus, "text"))}
    assert ours == corpus
    assert dict(zip(column(data.queries, "id"), column(data.queries, "text"))) == queries
    assert data.qrels == qrels


def test_metrics_equal_beirs_on_a_real_run_over_scifact(scifact):
    data = load_eval_data(str(scifact), "test")
    result = evaluate_bm25(data, k=100, measures=MEASURES)
    assert result.info["identical_ids_dropped"] == 0  # SciFact's query and document ids differ
    assert_same(result.metrics, beir_metrics(data.qrels, result.run, True))


def write_colliding_beir(root):
    """ArguAna's shape: every query is also a document, under the same id, and retrieves itself
    first; its relevant document is another one."""
    topics = ["solar panels on roofs", "tax on sugar drinks", "school uniforms",
              "nuclear power plants", "voting at sixteen", "banning plastic bags"]
    (root / "qrels").mkdir(parents=True)
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, topic in enumerate(topics):
        docs.append({"_id": f"a{i}", "title": "", "text": f"the case for {topic}"})
        docs.append({"_id": f"c{i}", "title": "", "text": f"against {topic}: the counter case"})
        queries.append({"_id": f"a{i}", "text": f"the case for {topic}"})
        qrels.append(f"a{i}\tc{i}\t1")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root


def test_identical_ids_are_ignored_by_default_as_beir_does(tmp_path):
    root = write_colliding_beir(tmp_path / "arguana_like")
    data = load_eval_data(str(root), "test")
    kept = evaluate_bm25(data, k=100, measures=MEASURES, ignore_identical_ids=False)
    assert all(max(docs, key=docs.get) == qid for qid, docs in kept.run.items())  # itself first
    raw = copy.deepcopy(kept.run)
    assert_same(kept.metrics, beir_metrics(data.qrels, raw, ignore_identical_ids=False))
    dropped = evaluate_bm25(data, k=100, measures=MEASURES)
    assert dropped.info["identical_ids_dropped"] == len(data.qrels)
    assert all(qid not in docs for qid, docs in dropped.run.items())
    assert_same(dropped.metrics, beir_metrics(data.qrels, raw, ignore_identical_ids=True))
    assert dropped.metrics["nDCG@10"] > kept.metrics["nDCG@10"]  # the protocol matters here


def test_the_command_line_follows_beirs_default_and_can_keep_them(tmp_path):
    root = write_colliding_beir(tmp_path / "arguana_like")
    base = ["--system", "bm25", "--data", str(root), "--split", "test", "--no-progress"]
    assert main([*base, "--output-dir", str(tmp_path / "default")]) == 0
    assert main([*base, "--no-ignore-identical-ids", "--output-dir", str(tmp_path / "kept")]) == 0
    default = json.loads((tmp_path / "default" / "metrics.json").read_text())
    kept = json.loads((tmp_path / "kept" / "metrics.json").read_text())
    assert default["identical_ids_dropped"] == 6 and default["ignore_identical_ids"]
    assert kept["ignore_identical_ids"] is False and "identical_ids_dropped" not in kept
    assert default["metrics"]["nDCG@10"] > kept["metrics"]["nDCG@10"]
    assert "a0 Q0 a0 " not in (tmp_path / "default" / "run.trec").read_text()
