"""Dense evaluation through on-disk corpus shards (common/eval/corpus_shards.py, `--shards`):
the same run as the in-RAM exact search, reused only while model, corpus and settings match,
rebuilt when incomplete, and the same under 2 processes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import twotower.common.eval.corpus_shards as corpus_shards
from tests.dist_utils import launch_prefix, run_to_end
from tests.test_eval_cli import write_beir
from twotower.common.data import load_beir
from twotower.common.eval.cli import main as eval_main
from twotower.common.eval.evaluate import evaluate_dense, subsample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return load_beir(write_beir(tmp_path_factory.mktemp("beir") / "tiny", n_filler=45), "test")


@pytest.fixture(scope="module")
def encoder(tiny_encoder_factory):
    return tiny_encoder_factory(hidden=32, layers=1, heads=2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):  # several blocks and shard files from a 55-document corpus
    monkeypatch.setattr(corpus_shards, "BLOCK_ROWS", 8)
    monkeypatch.setattr(corpus_shards, "SHARD_ROWS", 20)


def _runs_close(a, b, atol):
    assert a.keys() == b.keys()
    for qid in a:
        assert list(a[qid]) == list(b[qid]), qid
        np.testing.assert_allclose(list(a[qid].values()), list(b[qid].values()), atol=atol)


@pytest.mark.parametrize("normalize", [True, False])
def test_shards_give_the_in_ram_exact_run(tmp_path, beir, tiny_encoder_factory, normalize):
    encoder = tiny_encoder_factory(hidden=32, layers=1, heads=2, normalize=normalize)
    flat = evaluate_dense(encoder, beir, k=20, progress=False)
    sharded = evaluate_dense(encoder, beir, k=20, progress=False, shards=tmp_path / "emb",
                             shards_dtype="float32")
    _runs_close(flat.run, sharded.run, atol=1e-5)
    assert sharded.metrics == pytest.approx(flat.metrics)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["rows"] == 55  # 20 + 20 + 15
    assert sharded.info["index"] == "shards" and not sharded.info["timing"]["shards_reused"]


def test_float16_shards_rank_like_float32(tmp_path, beir, encoder):
    f32 = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "a",
                         shards_dtype="float32")
    f16 = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "b")
    assert f32.run.keys() == f16.run.keys()
    for qid, hits in f32.run.items():  # near-ties may swap: most of the top 10 agree, and scores
        common = hits.keys() & f16.run[qid].keys()
        assert len(common) >= 7, qid
        np.testing.assert_allclose([hits[d] for d in common], [f16.run[qid][d] for d in common],
                                   rtol=2e-3)


def test_a_subsampled_corpus_maps_rows_to_its_own_ids(tmp_path, beir, encoder):
    small = subsample(beir, max_queries=4, max_docs=10, seed=1)
    flat = evaluate_dense(encoder, small, k=5, progress=False)
    sharded = evaluate_dense(encoder, small, k=5, progress=False, shards=tmp_path / "emb",
                             shards_dtype="float32")
    _runs_close(flat.run, sharded.run, atol=1e-5)


def test_matching_shards_are_searched_without_encoding_the_corpus(tmp_path, beir, encoder,
                                                                 monkeypatch):
    first = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb")
    towers = []
    original = type(encoder).encode

    def spy(self, texts, tower="query", *args, **kwargs):
        towers.append(tower)
        return original(self, texts, tower, *args, **kwargs)
    monkeypatch.setattr(type(encoder), "encode", spy)
    again = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb")
    assert towers == ["query"] and again.info["timing"]["shards_reused"]
    assert again.run == first.run


def test_shards_of_another_model_or_corpus_are_an_error_and_kept(tmp_path, beir, encoder,
                                                                tiny_encoder_factory):
    evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "emb").iterdir())
    other = tiny_encoder_factory(hidden=32, layers=1, heads=2, seed=7)
    with pytest.raises(ValueError, match="differs in: model_fingerprint"):
        evaluate_dense(other, beir, k=10, progress=False, shards=tmp_path / "emb")
    fewer = subsample(beir, max_queries=3, max_docs=5, seed=0)
    with pytest.raises(ValueError, match="corpus_digest"):
        evaluate_dense(encoder, fewer, k=10, progress=False, shards=tmp_path / "emb")
    with pytest.raises(ValueError, match="differs in: dtype"):
        evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb",
                       shards_dtype="float32")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "emb").iterdir()) == before


def test_an_incomplete_folder_is_rebuilt_not_read(tmp_path, beir, encoder):
    first = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb")
    (tmp_path / "emb" / "manifest.json").unlink()  # a crash before the manifest
    (tmp_path / "emb" / "shard-00001.npy").write_bytes(b"torn")
    again = evaluate_dense(encoder, beir, k=10, progress=False, shards=tmp_path / "emb")
    assert not again.info["timing"]["shards_reused"] and again.run == first.run


@pytest.mark.parametrize("spec", ["IVF4,Flat", "IVF2,PQ4x4"])
def test_an_approximate_index_built_from_the_shards_equals_the_in_ram_one(tmp_path, beir,
                                                                          encoder, spec):
    """--shards with --index: the faiss index is filled from the shards a block at a time; when
    it is trained on every row (a small corpus) it is the index dense_search builds in RAM."""
    in_ram = evaluate_dense(encoder, beir, k=10, progress=False, index=spec)
    sharded = evaluate_dense(encoder, beir, k=10, progress=False, index=spec,
                             shards=tmp_path / "emb", shards_dtype="float32")
    _runs_close(in_ram.run, sharded.run, atol=1e-5)
    assert sharded.info["index"] == f"shards, {spec}" and "index_build_s" in sharded.info["timing"]


def test_an_approximate_index_trains_on_rows_spread_over_the_corpus(tmp_path, beir, encoder,
                                                                     monkeypatch):
    """A corpus larger than TRAIN_ROWS: the index is trained on evenly spread rows, not the
    corpus; with every cell probed an IVF-Flat index ranks exactly."""
    seen = []
    real = corpus_shards.take_rows

    def spy(parts, rows):
        seen.append(np.asarray(rows))
        return real(parts, rows)
    monkeypatch.setattr(corpus_shards, "TRAIN_ROWS", 12)
    monkeypatch.setattr(corpus_shards, "take_rows", spy)
    exact = evaluate_dense(encoder, beir, k=10, progress=False)
    ivf = evaluate_dense(encoder, beir, k=10, progress=False, index="IVF3,Flat",
                         search_params="nprobe=3", shards=tmp_path / "emb", shards_dtype="float32")
    assert [len(rows) for rows in seen] == [12] and seen[0][0] == 0 and seen[0][-1] == 54
    _runs_close(exact.run, ivf.run, atol=1e-5)


def test_cli_flags(tmp_path, capsys):
    for argv, message in (
            (["--system", "bm25", "--data", "x", "--shards", "d"], "--shards is for dense"),
            (["--model", "m", "--data", "x", "--shards-dtype", "float32"], "needs --shards")):
        with pytest.raises(SystemExit):
            eval_main(argv)
        assert message in capsys.readouterr().err


def test_two_processes_write_a_part_each_and_give_the_one_process_run(tmp_path, encoder):
    write_beir(tmp_path / "beir", n_filler=45)
    encoder.save(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "beir"), "--split",
            "test", "--k", "10", "--no-progress", "--shards-dtype", "float32"]
    two = run_to_end([*launch_prefix(2), "-m", "twotower.common.eval.evaluate", *args,
                      "--shards", str(tmp_path / "emb"), "--output-dir", str(tmp_path / "two")],
                     env=env, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["part-0-of-2", "part-1-of-2"]
    one = evaluate_dense(encoder, load_beir(tmp_path / "beir", "test"), k=10, progress=False)
    run = {}
    for line in (tmp_path / "two" / "run.trec").read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    _runs_close(one.run, run, atol=1e-4)
