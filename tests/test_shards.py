"""twotower.common.eval.shards: shard folders (write, validate, reject incomplete or corrupt ones)
and exact search over them, equal to search.py's faiss search, in memory bounded by a block."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from twotower.common.eval.search import dense_search
from twotower.common.eval.shards import (MANIFEST, ShardError, open_shards, run_from_rows,
                                         search_shards, write_shards)

N_DOCS, DIM = 1000, 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(N_DOCS, DIM)).astype(np.float32)
    docs[17] = 0.0  # a zero row: cosine leaves it zero
    queries = rng.normal(size=(9, DIM)).astype(np.float32)
    return queries, docs, [f"q{i}" for i in range(9)], [f"doc{i}" for i in range(N_DOCS)]


def blocks_of(matrix, cuts):
    """Row blocks of uneven sizes, cut at `cuts`."""
    edges = [0, *cuts, len(matrix)]
    return (matrix[a:b] for a, b in zip(edges, edges[1:]))


def assert_same_run(run, expected, atol=1e-5):
    assert list(run) == list(expected)
    for qid in expected:
        assert list(run[qid]) == list(expected[qid]), qid
        np.testing.assert_allclose(list(run[qid].values()), list(expected[qid].values()),
                                   rtol=1e-5, atol=atol)


@pytest.mark.parametrize("similarity", ["dot", "cos"])
@pytest.mark.parametrize("shard_rows,block_rows,cuts", [
    (N_DOCS, N_DOCS, []),              # one shard, one block
    (256, 100, [1, 333, 700]),         # blocks do not divide shards; last shard short (232 rows)
    (300, 64, [500]),
    (7, 5, [3, 4, 999]),               # tiny shards and blocks (fewer rows than k per block)
    (4096, 33, []),                    # shard larger than the corpus
])
def test_search_equals_dense_search(tmp_path, data, similarity, shard_rows, block_rows, cuts):
    queries, docs, qids, dids = data
    write_shards(blocks_of(docs, cuts), tmp_path, dtype="float32", shard_rows=shard_rows)
    shards = open_shards(tmp_path)
    assert (len(shards), shards.dim, shards.dtype) == (N_DOCS, DIM, np.float32)
    scores, rows = search_shards(queries, shards, 20, block_rows=block_rows,
                                 similarity=similarity, query_batch=4)
    assert scores.shape == rows.shape == (9, 20)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert (np.diff(scores, axis=1) <= 0).all()
    expected = dense_search(queries, docs, qids, dids, k=20, similarity=similarity)
    assert_same_run(run_from_rows(scores, rows, qids, dids), expected)


def test_k_larger_than_rows_returns_every_row(tmp_path, data):
    queries, docs, qids, dids = data
    write_shards([docs[:50]], tmp_path, dtype="float32", shard_rows=16)
    scores, rows = search_shards(queries, open_shards(tmp_path), 500, block_rows=7)
    assert scores.shape == rows.shape == (9, 50)
    assert all(sorted(r) == list(range(50)) for r in rows.tolist())
    expected = dense_search(queries, docs[:50], qids, dids[:50], k=500)
    assert_same_run(run_from_rows(scores, rows, qids, lambda r: f"doc{r}"), expected)


def test_equal_scores_are_ordered_by_row(tmp_path):
    docs = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # rows 0-2, 3-5, ... identical
    write_shards([docs], tmp_path, dtype="float32", shard_rows=5)
    scores, rows = search_shards(np.array([[1, 0.5, 0, 0]], np.float32), open_shards(tmp_path),
                                 6, block_rows=4)
    assert rows.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert scores.tolist() == [[1, 1, 1, 0.5, 0.5, 0.5]]


def test_float16_shards_are_close_to_float32(tmp_path, data):
    queries, docs, _, _ = data
    write_shards([docs], tmp_path / "f32", dtype="float32", shard_rows=300)
    write_shards(blocks_of(docs, [100]), tmp_path / "f16", dtype="float16", shard_rows=300)
    f16 = open_shards(tmp_path / "f16")
    assert f16.dtype == np.float16
    assert (tmp_path / "f16" / "shard-00000.npy").stat().st_size < 300 * DIM * 2 + 200
    exact_scores, exact_rows = search_shards(queries, open_shards(tmp_path / "f32"), 50)
    scores, rows = search_shards(queries, f16, 50, block_rows=128)
    overlap = [len(set(a) & set(b)) / 50 for a, b in zip(rows.tolist(), exact_rows.tolist())]
    assert min(overlap) >= 0.9, overlap
    np.testing.assert_allclose(scores, exact_scores, atol=1e-2)


def test_shards_are_npy_files_with_manifest(tmp_path, data):
    _, docs, _, _ = data
    write_shards(blocks_of(docs, [10, 20]), tmp_path, dtype="float16", shard_rows=400,
                 meta={"model": "m-fingerprint", "data": "d-fingerprint"})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [400, 400, 200]
    assert (manifest["dim"], manifest["dtype"], manifest["rows"]) == (DIM, "float16", N_DOCS)
    assert manifest["meta"] == {"model": "m-fingerprint", "data": "d-fingerprint"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        MANIFEST, "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    last = np.load(tmp_path / "shard-00002.npy", mmap_mode="r")
    np.testing.assert_array_equal(last, docs[800:].astype(np.float16))
    shards = open_shards(tmp_path, block_rows=150)
    assert shards.meta == manifest["meta"]
    starts = [start for start, _ in shards]
    assert starts == [0, 150, 300, 400, 550, 700, 800, 950]
    np.testing.assert_array_equal(np.concatenate([b for _, b in shards]),
                                  docs.astype(np.float16).astype(np.float32))


def test_truncated_shard_is_an_error_naming_it(tmp_path, data):
    write_shards([data[1]], tmp_path, dtype="float16", shard_rows=300)
    shard = tmp_path / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard-00001.npy"):
        open_shards(tmp_path)


def test_corrupt_header_is_an_error_naming_it(tmp_path, data):
    write_shards([data[1]], tmp_path, dtype="float32", shard_rows=300)
    shard = tmp_path / "shard-00002.npy"
    raw = bytearray(shard.read_bytes())
    raw[:6] = b"NOTNPY"
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="shard-00002.npy"):
        open_shards(tmp_path)


def test_folder_without_manifest_is_incomplete(tmp_path, data):
    write_shards([data[1]], tmp_path, dtype="float16", shard_rows=300)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(tmp_path)


def test_a_crashed_write_leaves_an_incomplete_folder(tmp_path, data):
    def failing_blocks():
        yield data[1][:500]
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        write_shards(failing_blocks(), tmp_path, dtype="float16", shard_rows=300)
    assert not list(tmp_path.glob("*.partial"))  # the half-written shard's temp file is gone
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(tmp_path)


def test_writing_twice_needs_overwrite(tmp_path, data):
    _, docs, _, _ = data
    write_shards([docs], tmp_path, dtype="float32", shard_rows=300)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards([docs[:10]], tmp_path, dtype="float32", shard_rows=300)
    assert len(open_shards(tmp_path)) == N_DOCS  # untouched
    write_shards([-docs[:10]], tmp_path, dtype="float16", shard_rows=300, overwrite=True,
                 meta={"v": 2})
    shards = open_shards(tmp_path)
    assert (len(shards), shards.dtype, shards.meta) == (10, np.float16, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard-00000.npy"]
    np.testing.assert_allclose(next(iter(shards))[1], -docs[:10], atol=1e-2)


def test_non_finite_embeddings_name_the_row(tmp_path, data):
    docs = data[1].copy()
    docs[523, 4] = np.nan
    with pytest.raises(ValueError, match="row 523 contains NaN"):
        write_shards(blocks_of(docs, [500]), tmp_path / "nan", dtype="float32", shard_rows=300)
    docs[523, 4] = 1e6  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="row 523 contains a value too large for float16"):
        write_shards(blocks_of(docs, [500]), tmp_path / "big", dtype="float16", shard_rows=300)


def test_invalid_arguments(tmp_path, data):
    queries, docs, qids, dids = data
    with pytest.raises(ValueError, match="dtype"):
        write_shards([docs], tmp_path, dtype="int8", shard_rows=300)
    with pytest.raises(ValueError, match=r"expected \[n, 32\]"):
        write_shards([docs, docs[:, :8]], tmp_path, dtype="float32", shard_rows=300)
    write_shards([docs], tmp_path, dtype="float32", shard_rows=300, overwrite=True)
    shards = open_shards(tmp_path)
    with pytest.raises(ValueError, match="query dim 8 != shard dim 32"):
        search_shards(queries[:, :8], shards, 10)
    with pytest.raises(ValueError, match="k must be > 0"):
        search_shards(queries, shards, 0)
    bad = queries.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="row 3"):
        search_shards(bad, shards, 10)
    with pytest.raises(ValueError, match="similarity"):
        search_shards(queries, shards, 10, similarity="l2")
    scores, rows = search_shards(queries, shards, 3)
    with pytest.raises(ValueError, match="same document id"):
        run_from_rows(scores, rows, qids, lambda row: "same")


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import torch
    from twotower.common.eval.shards import open_shards, search_shards, write_shards

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    folder, action = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    if action == "write":  # 260k x 768 float16 = 400 MB, generated 8192 rows at a time
        base = peak_mb()
        blocks = (rng.random((8192, 768), dtype=np.float32) - 0.5 for _ in range(32))
        write_shards(blocks, folder, dtype="float16", shard_rows=65536)
    else:
        queries = rng.random((100, 768), dtype=np.float32) - 0.5
        base = peak_mb()
        shards = open_shards(folder)
        scores, rows = search_shards(queries, shards, 10, block_rows=16384)
        assert rows.shape == (100, 10) and rows.max() < len(shards) == 32 * 8192
    print(f"growth_mb={peak_mb() - base:.1f}")
""")


@pytest.mark.slow
def test_search_memory_is_bounded_by_a_block_not_the_corpus(tmp_path):
    def growth_mb(action):
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), action],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.strip().rsplit("growth_mb=", 1)[1])

    write_growth = growth_mb("write")
    size_mb = sum(p.stat().st_size for p in tmp_path.glob("shard-*.npy")) / 2**20
    assert size_mb > 380
    search_growth = growth_mb("search")
    # a block is 16384 x 768: 48 MB in float32 (+24 MB read buffer); the shards are 400 MB
    assert search_growth < 150, (search_growth, size_mb)
    assert write_growth < 150, (write_growth, size_mb)


def test_take_reads_the_given_rows_across_shards(tmp_path, data):
    docs = data[1]
    shards = open_shards(write_shards(docs, tmp_path / "s", dtype="float32", shard_rows=7))
    rows = [12, 0, 6, 7, 12, len(docs) - 1]
    np.testing.assert_array_equal(shards.take(rows), docs[rows])
    with pytest.raises(IndexError):
        shards.take([len(docs)])
