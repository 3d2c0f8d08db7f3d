"""The on-disk id index (twotower.common.data.ids) and the TextStore built on it."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest

from twotower.common.data import load_msmarco_collection
from twotower.common.data.ids import IdIndex
from twotower.finetune.data import TextStore


def _collection(path, n, start=0):
    path.write_text("".join(f"{start + i}\tpassage number {start + i}\n" for i in range(n)))
    return path


def test_every_id_finds_its_row_and_unknown_ids_are_absent(tmp_path):
    table = load_msmarco_collection(_collection(tmp_path / "collection.tsv", 500),
                                    cache_dir=tmp_path / "cache")
    index = IdIndex(table)
    assert index.path.parent == Path(table.cache_files[0]["filename"]).parent
    for row in range(len(table)):
        assert index.row(table[row]["id"]) == row
    assert list(index.ids) == [str(i) for i in range(500)]
    assert "500" not in index and "-1" not in index and "" not in index
    with pytest.raises(KeyError):
        index.row("x")
    # a select / filter view: rows are the view's rows, ids outside it are absent
    view = table.select([7, 3, 400])
    sub = IdIndex(view)
    assert [sub.row(i) for i in ("7", "3", "400")] == [0, 1, 2] and "4" not in sub
    assert sub.path != index.path and list(sub.ids) == ["7", "3", "400"]


def test_the_saved_index_is_read_back_memory_mapped_not_rebuilt(tmp_path, monkeypatch):
    table = load_msmarco_collection(_collection(tmp_path / "c.tsv", 300), cache_dir=tmp_path / "k")
    IdIndex(table)
    monkeypatch.setattr(IdIndex, "_build", lambda self: pytest.fail("rebuilt a valid index"))
    again = IdIndex(table)
    assert isinstance(again.hashes, np.memmap) and isinstance(again.rows, np.memmap)
    assert again.row("299") == 299


def test_a_changed_data_file_never_reuses_the_old_index(tmp_path):
    path = _collection(tmp_path / "c.tsv", 100)
    old = IdIndex(load_msmarco_collection(path, cache_dir=tmp_path / "k"))
    _collection(path, 100, start=1000)  # the file rewritten with other ids
    new_table = load_msmarco_collection(path, cache_dir=tmp_path / "k")
    new = IdIndex(new_table)
    assert new.path != old.path
    assert "5" not in new and new.row("1005") == 5 and new_table[5]["id"] == "1005"


@pytest.mark.parametrize("damage", ["truncate_hashes", "flip_hash_bytes", "drop_rows_file",
                                    "header_rows"])
def test_a_corrupt_or_half_written_index_is_rebuilt_not_read(tmp_path, damage):
    table = load_msmarco_collection(_collection(tmp_path / "c.tsv", 2000),
                                    cache_dir=tmp_path / "k")
    index = IdIndex(table)
    hashes_file, rows_file, header_file = index._files()
    if damage == "truncate_hashes":
        hashes_file.write_bytes(hashes_file.read_bytes()[:-100])
    elif damage == "flip_hash_bytes":
        raw = bytearray(hashes_file.read_bytes())
        header = len(raw) - 8 * 2000
        for offset in range(header, len(raw)):
            raw[offset] ^= 0xFF
        hashes_file.write_bytes(bytes(raw))
    elif damage == "drop_rows_file":  # a crash before the last rename
        rows_file.unlink()
    else:
        header_file.write_text(json.dumps({**json.loads(header_file.read_text()), "rows": 5}))
    built = []
    original = IdIndex._build

    def spy(self):
        built.append(True)
        return original(self)
    IdIndex._build = spy
    try:
        again = IdIndex(table)
    finally:
        IdIndex._build = original
    assert built == [True]
    assert all(again.row(str(i)) == i for i in range(0, 2000, 37))


def test_duplicate_ids_are_an_error_naming_the_id():
    table = datasets.Dataset.from_dict({"id": ["a", "b", "a"], "text": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        IdIndex(table)


def test_text_store_from_table_reads_texts_by_id_without_a_python_id_list(tmp_path):
    table = load_msmarco_collection(_collection(tmp_path / "c.tsv", 50), cache_dir=tmp_path / "k")
    store = TextStore.from_table(table, with_title=True)
    assert not isinstance(store.ids, list) and len(store) == 50
    assert store["17"] == "passage number 17" and store.ids[17] == "17"
    assert "17" in store and "50" not in store
    with pytest.raises(KeyError, match="not in the text store"):
        store["50"]


def test_two_processes_read_one_index(tmp_path):
    path = _collection(tmp_path / "c.tsv", 1000)
    first = IdIndex(load_msmarco_collection(path, cache_dir=tmp_path / "k"))
    files = first._files()
    stamps = [f.stat().st_mtime_ns for f in files]
    script = textwrap.dedent(f"""
        from twotower.common.data import load_msmarco_collection
        from twotower.common.data.ids import IdIndex
        IdIndex._build = lambda self: (_ for _ in ()).throw(AssertionError("rebuilt"))
        index = IdIndex(load_msmarco_collection({str(path)!r}, cache_dir={str(tmp_path / 'k')!r}))
        assert index.row("999") == 999
        print(index.path)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o[0].strip() for o in outs} == {str(first.path)}
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_rows_of_many_ids_equals_row_of_each(tmp_path):
    table = load_msmarco_collection(_collection(tmp_path / "c.tsv", 300), cache_dir=tmp_path / "k")
    index = IdIndex(table)
    keys = ["5", "299", "x", "0", "5", "300", "", "17"]
    assert index.rows_of(keys).tolist() == [index.get(k, -1) for k in keys]
    assert index.rows_of(keys).tolist() == [5, 299, -1, 0, 5, -1, -1, 17]
    assert index.rows_of([]).tolist() == []
    view = IdIndex(table.select([7, 3, 400 % 300]))  # rows of the view
    assert view.rows_of(["3", "7", "100", "8"]).tolist() == [1, 0, 2, -1]
    assert view.ids.take([2, 0]) == ["100", "7"]


def test_rows_of_is_exact_when_every_hash_collides(tmp_path, monkeypatch):
    """The stored id is compared at each candidate row: with every id hashed alike (a forced
    collision) each still finds its own row, and an absent id none."""
    import twotower.common.data.ids as ids

    monkeypatch.setattr(ids, "hash_id", lambda key: 42)
    table = datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(20)],
                                        "text": ["t"] * 20})
    index = IdIndex(table)
    keys = [f"d{i}" for i in (19, 0, 7)] + ["d20"]
    assert index.rows_of(keys).tolist() == [19, 0, 7, -1]


def test_text_digests_are_cached_beside_the_table_and_equal_hashes_of_the_texts(tmp_path,
                                                                               monkeypatch):
    from twotower.common.data.ids import RowDigests, hash_id

    path = _collection(tmp_path / "c.tsv", 50)
    with path.open("a") as f:
        f.write("dup\tpassage number 7\n")  # the same text as row 7 under another id
    table = load_msmarco_collection(path, cache_dir=tmp_path / "k")
    store = TextStore.from_table(table, with_title=True)
    for key in ("0", "7", "49", "dup"):
        assert store.digest(key) == hash_id(store[key])
    assert store.digest("dup") == store.digest("7") != store.digest("8")
    files = list((tmp_path / "k").rglob("twotower-digests-*.npy"))
    assert len(files) == 1
    # read back memory-mapped, not rebuilt; a damaged file is rebuilt, never read
    monkeypatch.setattr(RowDigests, "_build", lambda self: pytest.fail("rebuilt valid digests"))
    again = TextStore.from_table(load_msmarco_collection(path, cache_dir=tmp_path / "k"), True)
    assert again.digest("7") == store.digest("7")
    assert isinstance(again._digests._digests, np.memmap)
    monkeypatch.undo()
    files[0].write_bytes(files[0].read_bytes()[:-8])  # truncated
    rebuilt = TextStore.from_table(load_msmarco_collection(path, cache_dir=tmp_path / "k"), True)
    assert rebuilt.digest("49") == hash_id(rebuilt["49"])
    raw = bytearray(files[0].read_bytes())
    raw[-8:] = bytes(8)  # the last row's digest zeroed: the spot check sees it
    files[0].write_bytes(bytes(raw))
    fixed = TextStore.from_table(load_msmarco_collection(path, cache_dir=tmp_path / "k"), True)
    assert fixed.digest("dup") == hash_id(fixed["dup"])
    view = TextStore.from_table(table.select([9, 2]), with_title=True)  # a view: its own rows
    assert view.digest("2") == hash_id(view["2"]) and view.digest("9") == hash_id(view["9"])
    assert TextStore.from_dict({"a": "x"}).digest("a") == hash_id("x")


def test_take_column_equals_arrows_take_a_chunk_at_a_time():
    """Rows in any order, repeated, across chunks of uneven length, one or none."""
    import pyarrow as pa

    from twotower.common.data.ids import chunk_offsets, take_column
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 50, size=40)
    column = pa.chunked_array([pa.array([f"id{start + i}" for i in range(n)], pa.string())
                               for start, n in zip(np.cumsum([0, *sizes[:-1]]), sizes)])
    offsets = chunk_offsets(column)
    for rows in (rng.integers(len(column), size=200), [0], [len(column) - 1], [],
                 np.arange(len(column))[::-1]):
        assert take_column(column, rows, offsets) == column.take(
            pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()
