"""Training groups held as arrays (twotower.finetune.groups.GroupArrays): the MS MARCO-layout pool
built from qrels and a hard-negatives file equals the rule recomputed slowly from the files, with
and without qrels, per-system caps, the teacher margin and a skipped bad line; selecting groups
keeps them arrays."""
import json
import random
from dataclasses import replace

import numpy as np
import pytest

from twotower.common import data as D
from twotower.common.data import DataError, load_hard_negatives
from twotower.finetune.args import DataArgs
from twotower.finetune.data import GroupDataset, TrainingPool
from twotower.finetune.groups import GroupArrays, TrainGroup, group_qids, select_groups
from twotower.finetune.sources import build_pool


def _write_msmarco(root, seed=0):
    """60 passages, 30 queries; qrels for 20 (two positives for some, a relevance-0 judgement);
    hard negatives from two systems for 21 queries (one outside the qrels);
    cross-encoder scores of every listed pair."""
    rng = random.Random(seed)
    root.mkdir()
    (root / "collection.tsv").write_text("".join(f"{100 + i}\tpassage {i} words {i % 7}\n"
                                                 for i in range(60)))
    (root / "queries.tsv").write_text("".join(f"{i}\tquery {i}\n" for i in range(30)))
    qrels, hard, scores = [], [], []
    for q in range(20):
        qrels.append(f"{q}\t0\t{100 + 2 * q}\t1\n")
        if q % 4 == 0:
            qrels.append(f"{q}\t0\t{101 + 2 * q}\t1\n")
        if q % 5 == 1:
            qrels.append(f"{q}\t0\t{102 + 2 * q}\t0\n")
    (root / "qrels.tsv").write_text("".join(qrels))
    for q in range(21):  # 20 is not judged
        pos = [100 + 2 * q] if q < 20 else [110]
        neg = {"bm25": rng.sample(range(100, 160), 6), "ce": rng.sample(range(100, 160), 4)}
        neg = {s: [str(p) for p in ps if p not in pos] for s, ps in neg.items()}
        hard.append({"qid": str(q), "pos": [str(p) for p in pos], "neg": neg})
        for p in [*map(str, pos), *neg["bm25"], *neg["ce"], str(101 + 2 * q)]:
            scores.append({"qid": str(q), "pid": p, "score": rng.uniform(0, 10)})
    (root / "hn.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hard))
    unique = {(s["qid"], s["pid"]): s for s in scores}  # a pair scored once
    (root / "ce.jsonl").write_text("".join(json.dumps(s) + "\n" for s in unique.values()))
    return root


def _expected(root, with_qrels, per_system, margin):
    """The rule, from the files: groups in the queries' order (qrels) or the file's, negatives
    from the query's line, filtered in the file's order."""
    teacher = {}
    for line in (root / "ce.jsonl").read_text().splitlines():
        s = json.loads(line)
        teacher.setdefault(s["qid"], {})[s["pid"]] = s["score"]
    groups = {}
    if with_qrels:
        judged = {}
        for line in (root / "qrels.tsv").read_text().splitlines():
            q, _, d, rel = line.split("\t")
            judged.setdefault(q, []).append(d) if int(rel) >= 1 else judged.setdefault(q, [])
        groups = {str(q): TrainGroup(str(q), judged[str(q)]) for q in range(30)
                  if judged.get(str(q))}
    table = load_hard_negatives(root / "hn.jsonl", cache_dir=root / "reference_cache")
    for row in table:
        group = groups.get(row["qid"])
        if group is None:
            if with_qrels:
                continue
            group = groups[row["qid"]] = TrainGroup(row["qid"], list(row["pos"]))
        bound = None
        if margin is not None:
            bound = min(teacher[row["qid"]][p] for p in group.positives) - margin
        taken, kept = {}, []
        for system, pid in zip(row["neg_system"], row["neg"]):
            if bound is not None and teacher[row["qid"]][pid] > bound:
                continue
            if per_system and taken.get(system, 0) >= per_system:
                continue
            taken[system] = taken.get(system, 0) + 1
            kept.append(pid)
        group.negatives = kept
    return [(g.qid, g.positives, list(g.negatives)) for g in groups.values()]


@pytest.mark.parametrize("with_qrels", [True, False])
@pytest.mark.parametrize("per_system, margin", [(0, None), (2, None), (0, 3.0), (3, 1.0)])
def test_array_groups_equal_the_rule_recomputed_from_the_files(tmp_path, with_qrels, per_system,
                                                               margin):
    root = _write_msmarco(tmp_path / "msmarco")
    pool = build_pool(DataArgs(
        kind="msmarco", path=str(root), queries="queries.tsv", qrels="qrels.tsv" if with_qrels
        else "", hard_negatives="hn.jsonl", teacher_scores="ce.jsonl" if margin else "",
        teacher_margin=margin, negatives_per_system=per_system))
    assert isinstance(pool.groups, GroupArrays)
    got = [(g.qid, g.positives, list(g.negatives)) for g in pool.groups]
    assert got == _expected(root, with_qrels, per_system, margin)
    assert group_qids(pool.groups) == [g[0] for g in got]


def test_a_bad_line_is_left_out_and_selection_keeps_arrays(tmp_path):
    root = _write_msmarco(tmp_path / "msmarco")
    lines = (root / "hn.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad["neg"]["ce"].append("99999")
    lines[3] = json.dumps(bad)
    (root / "hn.jsonl").write_text("\n".join(lines) + "\n")
    args = dict(kind="msmarco", path=str(root), queries="queries.tsv", qrels="qrels.tsv",
                hard_negatives="hn.jsonl", teacher_scores="", teacher_margin=None,
                negatives_per_system=0)
    with pytest.raises(DataError, match="query '3': passage '99999' is not in the corpus"):
        build_pool(DataArgs(**args))
    pool = build_pool(DataArgs(**args, on_error="skip"))
    by_qid = {g.qid: g for g in pool.groups}
    assert len(by_qid["3"].negatives) == 0 and len(by_qid["4"].negatives) > 0
    picked = select_groups(pool.groups, [5, 0, 2])
    assert isinstance(picked, GroupArrays)
    assert [(g.qid, g.positives, list(g.negatives)) for g in picked] == [
        (g.qid, g.positives, list(g.negatives)) for g in (pool.groups[5], pool.groups[0],
                                                          pool.groups[2])]
    assert select_groups(list(pool.groups), [1])[0].qid == pool.groups[1].qid
    few = build_pool(DataArgs(**args, on_error="skip", max_queries=4, sample_seed=1))
    assert isinstance(few.groups, GroupArrays) and len(few.groups) == 4
    edited = pool.groups[0]
    edited.negatives = ["100"]  # an object read from the arrays: the arrays do not change
    assert list(pool.groups[0].negatives) != ["100"]
    assert np.array_equal(pool.groups.negative_bounds.shape, (len(pool.groups), 2))


@pytest.mark.parametrize("k", [2, 4, 12])
def test_sampling_array_groups_reads_the_digests_it_would_look_up(tmp_path, k):
    """A group read from GroupArrays carries its rows: the sampler reads the texts' digests
    from them (texts_of without a lookup), and the epoch order draws them from the arrays alone.
    The draws, the digests and the order equal those of the same groups as plain TrainGroups
    (ids only), short pools (filled at random) included."""
    root = _write_msmarco(tmp_path / "msmarco")
    pool = build_pool(DataArgs(kind="msmarco", path=str(root), queries="queries.tsv",
                               qrels="qrels.tsv", hard_negatives="hn.jsonl", teacher_scores="",
                               teacher_margin=None, negatives_per_system=0))
    plain = TrainingPool([TrainGroup(g.qid, g.positives, g.negatives) for g in pool.groups],
                         pool.queries, pool.docs)
    fast = GroupDataset(pool, k, short_pool="random", seed=5, global_batch_size=2)
    slow = GroupDataset(plain, k, short_pool="random", seed=5, global_batch_size=2)
    read = 0
    for epoch in range(2):
        for i in range(len(fast)):
            a, b = fast.sample(i, epoch), slow.sample(i, epoch)
            assert a == b and b.digests is None
            read += a.digests is not None
            assert fast.texts_of(a) == slow.texts_of(b) == slow.texts_of(replace(a, digests=None))
            ordered = fast._drawn_digests(i, epoch)  # the epoch order's path: no id read
            assert ordered == (slow.texts_of(b) if k <= 4 else None)
        assert fast.epoch_order(epoch, 5) == slow.epoch_order(epoch, 5)
    assert read == (2 * len(fast) if k <= 4 else 0)  # a short pool is filled, then looked up


def test_qrels_ids_are_checked_together_and_a_bad_line_still_named(tmp_path, monkeypatch):
    """The qrels are read once when every id is known (looked up together); an unknown id sends
    the file to the reader's per-line check, which names the line, or counts it with skip."""
    root = _write_msmarco(tmp_path / "msmarco")
    reads = []
    real = D.load_qrels
    monkeypatch.setattr(D, "load_qrels", lambda *a, **k: reads.append(k) or real(*a, **k))
    args = dict(kind="msmarco", path=str(root), queries="queries.tsv", qrels="qrels.tsv",
                hard_negatives="", teacher_scores="", teacher_margin=None)
    assert len(build_pool(DataArgs(**args)).groups) == 20 and len(reads) == 1
    with open(root / "qrels.tsv", "a") as f:
        f.write("77\t0\t100\t1\n")  # line 30: a query the queries file lacks
    with pytest.raises(DataError, match=r"qrels.tsv:30.*unknown query id '77'"):
        build_pool(DataArgs(**args))
    assert "query_ids" in reads[-1]
    report = D.SkipReport()
    pool = build_pool(DataArgs(**args, on_error="skip"), report=report)
    assert len(pool.groups) == 20 and sum(report.counts.values()) == 1
