"""Teacher scores on disk (twotower.common.data.scores): the same answers as a dict of dicts
read line by line, the duplicate rule, the cached index, the overlay, and no dict of every pair."""
import glob
import json
import pickle
import tracemalloc

import numpy as np
import pytest

from tests.fixtures_data import at, write_jsonl
from twotower.common.data import DataError, SkipReport, TeacherScores, load_teacher_scores
from twotower.common.data import scores as scores_module


def reference(lines, skip):
    """The reader as a dict: a line repeating an accepted (qid, pid) pair raises or is dropped."""
    scores, dropped = {}, []
    for line_no, obj in enumerate(lines, 1):
        qid = str(obj["qid"])
        by_pid = ({str(p): float(s) for p, s in obj["scores"].items()} if "scores" in obj
                  else {str(obj["pid"]): float(obj["score"])})
        if any(p in scores.get(qid, {}) for p in by_pid):
            if not skip:
                raise AssertionError(f"line {line_no} repeats a pair")
            dropped.append(line_no)
            continue
        scores.setdefault(qid, {}).update(by_pid)
    return scores, dropped


def random_lines(rng, n_lines, n_queries=30, n_pids=40):
    lines = []
    for _ in range(n_lines):
        qid = int(rng.integers(n_queries))
        if rng.random() < 0.5:
            lines.append({"qid": qid, "pid": int(rng.integers(n_pids)),
                          "score": round(float(rng.normal()), 3)})
        else:
            pids = rng.choice(n_pids, size=int(rng.integers(1, 4)), replace=False)
            lines.append({"qid": qid, "scores": {str(p): round(float(rng.normal()), 3)
                                                 for p in pids}})
    return lines


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skipping_equals_a_dict_reader_with_repeats(tmp_path, seed):
    lines = random_lines(np.random.default_rng(seed), 300)
    expected, dropped = reference(lines, skip=True)
    assert dropped  # the random file repeats pairs, including after dropped lines
    path = write_jsonl(tmp_path / "scores.jsonl", lines)
    report = SkipReport()
    got = load_teacher_scores(path, on_error="skip", report=report, cache_dir=tmp_path / "c")
    assert dict(got.items()) == expected and got.dropped == len(dropped)
    assert report.counts[(str(path), "duplicate score")] == len(dropped)
    assert report.example_lines[(str(path), "duplicate score")] == dropped[:3]
    again = SkipReport()  # the cached index reports the same skips
    assert load_teacher_scores(path, on_error="skip", report=again,
                               cache_dir=tmp_path / "c") == expected
    assert again.counts == report.counts


def test_a_line_clashing_only_with_a_dropped_line_is_kept(tmp_path):
    lines = [{"qid": 1, "scores": {"a": 1.0}}, {"qid": 2, "pid": "a", "score": 7.0},
             {"qid": 1, "scores": {"a": 2.0, "b": 3.0}},  # repeats (1, a): dropped
             {"qid": 1, "scores": {"b": 4.0}}]            # (1, b) was only on the dropped line
    path = write_jsonl(tmp_path / "scores.jsonl", lines)
    got = load_teacher_scores(path, on_error="skip", cache_dir=tmp_path / "c")
    assert got == {"1": {"a": 1.0, "b": 4.0}, "2": {"a": 7.0}}
    with pytest.raises(DataError, match=at(path, 3) + "duplicate score for query '1', passage "
                                                      "'a': also on line 1"):
        load_teacher_scores(path, cache_dir=tmp_path / "c")


def test_hash_collisions_cost_comparisons_not_answers(tmp_path, monkeypatch):
    """Every qid and pair hashed alike: lookups and the duplicate rule stay exact."""
    monkeypatch.setattr(scores_module, "hash_id", lambda key: 7)
    monkeypatch.setattr(scores_module, "hash_ids",
                        lambda keys: np.full(len(keys), 7, dtype=np.uint64))
    lines = random_lines(np.random.default_rng(5), 120)
    expected, _ = reference(lines, skip=True)
    path = write_jsonl(tmp_path / "scores.jsonl", lines)
    got = load_teacher_scores(path, on_error="skip", cache_dir=tmp_path / "c")
    for qid, by_pid in expected.items():
        assert got[qid] == by_pid
    assert got.get("no such query") is None and "no such query" not in got


def test_the_public_pickle_and_a_damaged_index(tmp_path):
    raw = {q: {p: np.float32(q + p / 8) for p in range(q + 1)} for q in range(50)}
    path = tmp_path / "ce-scores.pkl"
    path.write_bytes(pickle.dumps(raw))
    expected = {str(q): {str(p): float(s) for p, s in d.items()} for q, d in raw.items()}
    assert load_teacher_scores(path, cache_dir=tmp_path / "c") == expected
    (rows_file,) = glob.glob(str(tmp_path / "c" / "**" / "twotower-scores-*.rows.npy"),
                             recursive=True)
    with open(rows_file, "r+b") as f:  # scramble the rows: spot-checked, rebuilt, never read
        f.seek(-64, 2)
        f.write(b"\x07" * 64)
    assert load_teacher_scores(path, cache_dir=tmp_path / "c") == expected
    with open(rows_file, "r+b") as f:  # half-written
        f.truncate(100)
    assert load_teacher_scores(path, cache_dir=tmp_path / "c") == expected


def test_overlay_adds_and_replaces_like_a_dict(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"qid": 1, "scores": {"a": 1.0, "b": 2.0}}])
    scores = load_teacher_scores(path, cache_dir=tmp_path / "c")
    scores.setdefault("1", {})["c"] = 3.0         # a teacher model scoring a missing pair
    scores.setdefault("9", {})["a"] = 9.0
    assert scores["1"] == {"a": 1.0, "b": 2.0, "c": 3.0} and scores["9"] == {"a": 9.0}
    scores["1"] = {"z": 0.5}                      # a training file's own scores replace
    assert scores["1"] == {"z": 0.5} and sorted(scores) == ["1", "9"]
    fresh = load_teacher_scores(path, cache_dir=tmp_path / "c")
    fresh.add_unscored({"1": {"a": -5.0, "d": 4.0}, "2": {"a": 6.0}})  # the file wins
    assert fresh == {"1": {"a": 1.0, "b": 2.0, "d": 4.0}, "2": {"a": 6.0}}
    copy = pickle.loads(pickle.dumps(fresh))      # a DataLoader worker's copy
    assert isinstance(copy, TeacherScores) and copy == fresh


def test_no_dict_of_every_pair_is_held(tmp_path):
    """50k scored pairs: reopening the cached table holds a small fraction of what the dict of
    dicts takes (tracemalloc counts Python and numpy allocations, not mapped files)."""
    rng = np.random.default_rng(0)
    lines = [{"qid": q, "scores": {str(p): float(s) for p, s in zip(
        rng.choice(10 ** 6, 100, replace=False), rng.normal(size=100))}} for q in range(500)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    load_teacher_scores(path, cache_dir=tmp_path / "c")  # build the table and its index

    def held(make):
        tracemalloc.start()
        kept = make()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert kept is not None
        return size

    as_dict = held(lambda: {str(o["qid"]): o["scores"]  # what the reader held before
                            for o in map(json.loads, path.read_text().splitlines())})
    on_disk = held(lambda: load_teacher_scores(path, cache_dir=tmp_path / "c"))
    assert as_dict > 3_000_000 and on_disk < as_dict / 10, (on_disk, as_dict)


def test_columns_chunked_differently_are_read_each_by_its_own_chunks():
    import datasets
    import pyarrow as pa

    from twotower.common.data import BadLinePolicy
    qids, pids = ["1", "2", "3", "1"], [["a"], ["b", "c"], ["d"], ["e"]]
    scores = [[1.0], [2.0, 3.0], [4.0], [5.0]]
    table = pa.table({"qid": pa.chunked_array([qids[:1], qids[1:]]),
                      "line": pa.chunked_array([[1, 2, 3], [4]]),
                      "pids": pa.chunked_array([pids[:3], pids[3:]]),
                      "scores": pa.chunked_array([scores[:2], scores[2:]])})
    got = TeacherScores(datasets.Dataset(table), "scores.jsonl", BadLinePolicy())
    assert got == {"1": {"a": 1.0, "e": 5.0}, "2": {"b": 2.0, "c": 3.0}, "3": {"d": 4.0}}
