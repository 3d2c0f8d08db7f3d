"""twotower.common.eval.evaluate end to end on tiny folders written here (BEIR and MS MARCO layouts)."""
import json
import random
import tracemalloc

import datasets
import pytest

from twotower.common.data import RetrievalData
from twotower.common.eval.cli import main
from twotower.common.eval.evaluate import evaluate_bm25, load_eval_data, subsample
from twotower.common.eval.metrics import compute_metrics

TOPICS = ["mangrove swamp", "volcano lava", "glacier ice", "desert dune", "coral reef",
          "tundra permafrost", "rainforest canopy", "savanna grassland", "estuary tide",
          "prairie bison"]


def write_beir(root, n_filler=20):
    """10 topic documents (doc-i is about TOPICS[i]) + fillers; query i asks about topic i."""
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": f"doc-{i}", "title": t.title(), "text": f"All about the {t} and its {t}."}
            for i, t in enumerate(TOPICS)]
    docs += [{"_id": f"filler-{j}", "title": "", "text": f"unrelated note number {j} on cooking"}
             for j in range(n_filler)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"what is a {t}"} for i, t in enumerate(TOPICS)]
    queries.append({"_id": "q-unjudged", "text": "cooking note"})
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc-{i}\t1\n" for i in range(10))
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


@pytest.fixture
def beir_dir(tmp_path):
    return write_beir(tmp_path / "tinybeir")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_encoder_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder_factory(hidden=32, layers=1, heads=2).save(path)
    return path


def read_run(path):
    run = {}
    for line in path.read_text().splitlines():
        qid, _, did, rank, score, _tag = line.split()
        run.setdefault(qid, {})[did] = float(score)
    return run


def test_dense_cli_writes_its_outputs_and_refuses_to_overwrite(beir_dir, tiny_model_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(beir_dir), "--split", "test",
            "--output-dir", str(out), "--k", "5", "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.md",
                                                     "run.trec"]
    summary = json.loads((out / "metrics.json").read_text())
    run = read_run(out / "run.trec")
    assert set(run) == {f"q{i}" for i in range(10)}  # judged queries only
    assert all(len(docs) == 5 for docs in run.values())
    qrels = {f"q{i}": {f"doc-{i}": 1} for i in range(10)}
    # the metrics written are those of the run written
    for name, value in compute_metrics(qrels, run).items():
        assert summary["metrics"][name] == pytest.approx(value, abs=1e-6)
    assert summary["n_queries"] == 10 and summary["n_docs"] == 30 and summary["split"] == "test"
    assert summary["model"] == str(tiny_model_dir) and summary["timing"]["total_s"] > 0
    report = (out / "report.md").read_text()
    assert "nDCG@10" in report and str(tiny_model_dir) in report
    assert "## Worst queries by nDCG@10" in report  # examples drawn from the data

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}  # untouched
    assert main(argv + ["--overwrite", "--k", "3"]) == 0
    assert all(len(docs) == 3 for docs in read_run(out / "run.trec").values())


@pytest.mark.parametrize("extra, message", [
    (["--system", "bm25", "--bogus"], "unrecognized arguments: --bogus"),
    (["--system", "bm25", "--max-len", "12"], "unrecognized arguments: --max-len"),  # no prefixes
    (["--system", "bm25", "--model", "x"], "takes no --model"),
    (["--system", "bm25", "--index", "hnsw"], "--index/--search-params are for dense"),
    (["--system", "bm25", "--metrics", "nDCG@10", "foo@3"], "unknown metric 'foo@3'"),
    (["--model", "m", "--bm25-k1", "1.2"], "--bm25-k1 need --system bm25"),
    (["--system", "bm25", "--rerank", "r.trec", "--k", "10"], "do not apply to --rerank"),
    (["--split", "test"], "--model is required"),
])
def test_bad_flags_error_before_any_work(beir_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(beir_dir), "--output-dir", str(tmp_path / "o")] + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_split_is_a_clean_error(beir_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--system", "bm25", "--data", str(beir_dir), "--split", "dev",
              "--output-dir", str(tmp_path / "o")])
    assert exc.value.code == 1
    assert "no qrels for split 'dev'" in capsys.readouterr().err


def test_bm25_cli_default_output_dir(beir_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--system", "bm25", "--data", str(beir_dir)]) == 0
    out = tmp_path / "runs" / "eval" / "bm25-tinybeir-test"
    summary = json.loads((out / "metrics.json").read_text())
    # each query names its topic words, which only its own document contains
    assert summary["metrics"]["MRR@10"] == 1.0 and summary["metrics"]["nDCG@10"] == 1.0
    assert summary["system"] == "bm25"


def write_msmarco(root):
    root.mkdir()
    passages = [(str(100 + i), f"The {t} is a natural place.") for i, t in enumerate(TOPICS)]
    (root / "collection.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in passages))
    (root / "queries.tsv").write_text(
        "".join(f"{i}\twhere is the {t}\n" for i, t in enumerate(TOPICS[:4])))
    (root / "qrels.tsv").write_text("".join(f"{i}\t0\t{100 + i}\t1\n" for i in range(4)))
    return root


def test_rerank_scores_only_candidates_msmarco_layout(tmp_path, tiny_model_dir):
    data_dir = write_msmarco(tmp_path / "mm")
    cands = {"0": ["100", "105", "107"], "1": ["101", "102"], "2": ["109", "108"], "77": ["100"]}
    lines = [f"{q} Q0 {d} {r + 1} {10.0 - r} bm25"
             for q, ds in cands.items() for r, d in enumerate(ds)]
    (tmp_path / "cands.trec").write_text("\n".join(lines) + "\n")
    for system in (["--model", str(tiny_model_dir)], ["--system", "bm25"]):
        out = tmp_path / f"out-{system[0]}"
        assert main(system + ["--data", str(data_dir), "--split", "dev", "--rerank",
                              str(tmp_path / "cands.trec"), "--output-dir", str(out),
                              "--no-progress"]) == 0
        run = read_run(out / "run.trec")
        # judged queries with candidates, exactly their candidates; "77" is not judged, "3" has none
        assert {q: set(d) for q, d in run.items()} == {q: set(cands[q]) for q in ("0", "1", "2")}
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["mode"] == "rerank" and summary["judged_queries_without_candidates"] == 1
        assert summary["candidate_queries_not_judged"] == 1
        assert summary["n_candidates"] == 7 and summary["candidates"] == str(tmp_path / "cands.trec")
        # query 2's relevant passage (102) is not among its candidates; query 3 has none
        assert summary["metrics"]["R@10"] == pytest.approx(2 / 4)


def test_subsample_keeps_judged_documents(beir_dir):
    data = load_eval_data(str(beir_dir), "test")
    small = subsample(data, max_queries=3, max_docs=4, seed=1)
    assert len(small.qrels) == 3 and len(small.queries) == 3
    judged = {d for docs in small.qrels.values() for d in docs}
    corpus_ids = set(small.corpus["id"])
    assert judged <= corpus_ids and len(corpus_ids) == 3 + 4
    assert subsample(data, 3, 4, seed=1).qrels == small.qrels  # seeded


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subsample_picks_what_sampling_the_listed_ids_picks(beir_dir, seed):
    """subsample works on the Arrow id column (no Python list of every id); its rows are those
    of the list-based algorithm it replaced, re-computed here slowly."""
    data = load_eval_data(str(beir_dir), "test")
    rng = random.Random(seed)
    qids = [q for q in (str(i) for i in data.queries["id"]) if q in data.qrels]
    qids = sorted(rng.sample(qids, 2), key=qids.index)
    judged = {d for q in qids for d in data.qrels[q]}
    doc_ids = [str(d) for d in data.corpus["id"]]
    others = [i for i, d in enumerate(doc_ids) if d not in judged]
    extra = set(rng.sample(others, min(3, len(others))))
    expected = [d for i, d in enumerate(doc_ids) if d in judged or i in extra]
    small = subsample(data, max_queries=2, max_docs=3, seed=seed)
    assert list(small.corpus["id"]) == expected and sorted(small.qrels) == sorted(qids)
    assert list(subsample(data, max_docs=10 ** 6, seed=seed).corpus["id"]) == doc_ids


def test_bm25_reproduces_scifact_reference(shared_data_root):
    """The reference figure of the data README (bm25s, English stemmer + stopwords)."""
    result = evaluate_bm25(load_eval_data(str(shared_data_root / "scifact"), "test"))
    assert result.info["n_queries"] == 300 and result.info["n_docs"] == 5183
    assert result.metrics["nDCG@10"] == pytest.approx(0.686, abs=0.01)
    assert result.metrics["R@100"] == pytest.approx(0.913, abs=0.01)


def test_DenseEvaluator_uses_the_sliced_data(beir_dir, tiny_model_dir):
    from twotower.common.eval.evaluate import DenseEvaluator, evaluate_dense
    from twotower.common.model.encoder import Encoder
    from twotower.common.recipe.args import EvalArgs

    args = EvalArgs(data=str(beir_dir), split="test", max_queries=3, max_docs=2,
                    metrics=["nDCG@10", "RR@10"])
    encoder = Encoder.load(str(tiny_model_dir))
    got = DenseEvaluator(args)(encoder)
    data = subsample(load_eval_data(str(beir_dir), "test"), 3, 2, seed=0)
    want = evaluate_dense(encoder, data, measures=["nDCG@10", "RR@10"], progress=False)
    assert want.info["n_queries"] == 3 and want.info["n_docs"] == 5
    assert got == want.metrics and list(got) == ["nDCG@10", "MRR@10"]


def test_eval_bf16_and_compile_reach_the_encoder(beir_dir, tiny_model_dir, tmp_path,
                                                encode_options_seen):
    """--bf16/--compile (CLI) and eval.bf16/eval.compile (training evaluations) set what every
    encode call of the evaluation uses."""
    from twotower.common.eval.evaluate import DenseEvaluator
    from twotower.common.model.encoder import Encoder
    from twotower.common.recipe.args import EvalArgs

    seen = encode_options_seen
    assert main(["--model", str(tiny_model_dir), "--data", str(beir_dir), "--split", "test",
                 "--output-dir", str(tmp_path / "a"), "--no-progress", "--bf16", "--compile"]) == 0
    assert seen and set(seen) == {(True, True)}
    seen.clear()
    evaluate = DenseEvaluator(EvalArgs(data=str(beir_dir), bf16=True))
    encoder = Encoder.load(str(tiny_model_dir))
    evaluate(encoder)
    assert set(seen) == {(True, False)}
    assert (encoder.encode_bf16, encoder.encode_compile) == (False, False)  # restored after


def test_subsample_of_a_large_corpus_lists_no_ids_in_python(tmp_path):
    """--max-docs / eval.max_docs on a large collection: Python allocations stay far below one
    string per document (the list-based version peaked at ~100 bytes a document here)."""
    n = 300_000
    corpus = datasets.Dataset.from_dict({"id": [f"doc{i}" for i in range(n)],
                                         "text": ["x"] * n}).flatten_indices()
    corpus.save_to_disk(tmp_path / "c")
    corpus = datasets.load_from_disk(tmp_path / "c")  # memory-mapped, as a cached collection
    data = RetrievalData(corpus=corpus, queries=datasets.Dataset.from_dict(
        {"id": ["q1"], "text": ["q"]}), qrels={"q1": {"doc5": 1}}, name="big", split="dev")
    tracemalloc.start()
    small = subsample(data, max_docs=1000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(small.corpus) == 1001 and "doc5" in set(small.corpus["id"])
    assert peak < 12 * n, f"peak {peak / n:.0f} bytes a document"
