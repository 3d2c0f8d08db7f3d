"""Build a TrainingPool from a recipe's `data` section, reading the raw formats through
twotower.common.data (BEIR, MS MARCO collection/queries/qrels/triples/hard negatives/teacher scores) plus
the generic jsonl `{"query", "positives", "negatives", "scores"}` read here.

Pseudo-labelled pools (data.kind=pseudo) are built by twotower.finetune.pseudo, which needs a teacher.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from twotower.common import data as D
from twotower.common.data.io import get_field, iter_lines, parse_json_object, parse_score
from twotower.common.model.encoder import doc_text
from twotower.common.recipe.config import RecipeError
from twotower.finetune.args import DataArgs
from twotower.finetune.data import TextStore, TrainingPool, stable_hash
from twotower.finetune.groups import GroupArrays, TrainGroup, group_qids, select_groups
from twotower.finetune.hard_negatives import attach_negatives
from twotower.finetune.data_files import _file, data_file, data_root
from twotower.finetune.mine import MineArgs, mine_together
from twotower.finetune.pseudo import pseudo_label_pool
from twotower.finetune.sentence_queries import sentences_pool

log = logging.getLogger("twotower.finetune")


def text_id(prefix: str, text: str) -> str:
    """A stable id for a text that came without one (triples, generic jsonl)."""
    return f"{prefix}{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def _positives(judged: Dict[str, int], min_relevance: int) -> List[str]:
    return [d for d, rel in judged.items() if rel >= min_relevance]


def _groups_from_qrels(queries: TextStore, docs: TextStore, qrels: Dict[str, Dict[str, int]],
                       min_relevance: int, where: str) -> GroupArrays:
    """A group for each judged query with a positive, in the queries' order, as arrays."""
    query_rows, positive_ids, lengths, without = [], [], [], 0
    for row, qid in enumerate(queries.ids):
        judged = qrels.get(qid)
        if judged is None:
            continue
        positives = _positives(judged, min_relevance)
        if not positives:
            without += 1
            continue
        query_rows.append(row)
        positive_ids += positives
        lengths.append(len(positives))
    if without:
        log.warning("%s: %d judged queries have no judgement >= %d (data.min_relevance) and are "
                    "not training groups", where, without, min_relevance)
    rows = docs.rows_of(positive_ids)
    if (rows < 0).any():  # load_qrels checked them against the corpus
        raise D.DataError(f"{where}: positive {positive_ids[int(np.flatnonzero(rows < 0)[0])]!r}"
                          " is not in the corpus")
    return GroupArrays(queries, docs, query_rows, rows,
                       np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


def _checked_qrels(path: Path, queries: TextStore, docs: TextStore, read: Dict) -> Dict:
    """load_qrels with every id checked against the stores, the ids looked up together
    (rows_of; one at a time, MS MARCO's ~1 M were ~7 s of the 8.8 M start). Only when a
    line fails (an unknown id, or anything else) is the file read again with the reader's own
    per-line checks, which name that line or count it with skip: the result, errors and counts
    are the checked reader's."""
    try:
        qrels = D.load_qrels(path, **read)
    except D.DataError:
        qrels = None
    if qrels is None or (queries.rows_of(list(qrels)) < 0).any() or (docs.rows_of(
            [p for judged in qrels.values() for p in judged]) < 0).any():
        qrels = D.load_qrels(path, query_ids=queries, doc_ids=docs, **read)
    return qrels


def _beir_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    rd = D.load_beir(data.path, data.split, **read)
    docs = TextStore.from_table(rd.corpus, with_title=True)
    queries = TextStore.from_table(rd.queries, with_title=False)
    groups = _groups_from_qrels(queries, docs, rd.qrels, data.min_relevance,
                                f"{data.path}/{data.split}")
    groups = attach_negatives(groups, data, None, docs, queries, teacher, read)
    return TrainingPool(groups, queries, docs, teacher=teacher, source=f"{data.path} ({data.split})",
                        mining_data=(lambda: rd) if data.mine.retriever else None)


def _msmarco_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    root = data_root(data)
    docs = TextStore.from_table(D.load_msmarco_collection(_file(root, data.collection), **read), True)
    queries = TextStore.from_table(D.load_msmarco_queries(_file(root, data.queries), **read), False)
    if data.qrels:
        qrels = _checked_qrels(_file(root, data.qrels), queries, docs, read)
        groups = _groups_from_qrels(queries, docs, qrels, data.min_relevance, str(root))
        del qrels  # the groups hold what training needs, as arrays
    elif not data.hard_negatives:
        raise D.DataError("msmarco data needs data.qrels or data.hard_negatives (for positives)",
                          path=root)
    else:
        groups = GroupArrays(queries, docs, [], [], [0])
    groups = attach_negatives(groups, data, root, docs, queries, teacher, read,
                               use_file_positives=not data.qrels)

    def mining_data():  # every judged query of the file, as before the dev and few-shot cuts
        judged = {g.qid for g in groups}
        kept = [i for i, q in enumerate(queries.ids) if q in judged]
        table = D.load_msmarco_queries(_file(root, data.queries), **read).select(kept)
        return D.RetrievalData(
            corpus=D.load_msmarco_collection(_file(root, data.collection), **read), queries=table,
            qrels={g.qid: {p: 1 for p in g.positives} for g in groups}, name=root.name,
            split="train")
    return TrainingPool(groups, queries, docs, teacher=teacher, source=str(root),
                        mining_data=mining_data if data.mine.retriever else None)


def _mine_negatives(pool: TrainingPool, data: DataArgs) -> None:
    """data.mine: negatives from BM25 / a dense model, with the rank window of twotower.finetune.mine.
    Every process calls it (dense mining encodes one slice of the corpus per process)."""
    if not data.mine.retriever:
        return

    m = data.mine
    args = MineArgs(retriever=m.retriever, model=m.model, fusion=m.fusion,
                    dense_weight=m.dense_weight, depth=m.depth, skip_top=m.skip_top,
                    window=m.window, n=m.n, seed=data.sample_seed,
                    max_pos_ratio=m.max_pos_ratio, max_score=m.max_score, bf16=m.bf16,
                    compile=m.compile, shards=m.shards)
    mined = mine_together(pool.mining_data(), args)
    pool.mining_data = None  # the corpus table is not needed by training
    pool.groups = list(pool.groups)  # edited below: objects, not arrays
    for g in pool.groups:
        g.negatives = [p for p in mined.get(g.qid, {}).get("neg", []) if p not in g.positives]
    log.info("mined %s negatives: %s", m.retriever, args.stats)


def _triples_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    table = D.load_triples(data.path, **read)
    query_texts: Dict[str, str] = {}
    doc_texts: Dict[str, str] = {}
    groups: Dict[str, TrainGroup] = {}
    for row in table:
        qid, pos, neg = text_id("q", row["query"]), text_id("d", row["positive"]), text_id("d", row["negative"])
        query_texts[qid], doc_texts[pos], doc_texts[neg] = row["query"], row["positive"], row["negative"]
        group = groups.setdefault(qid, TrainGroup(qid, []))
        if pos not in group.positives:
            group.positives.append(pos)
        if neg not in group.negatives:
            group.negatives.append(neg)
    return TrainingPool(list(groups.values()), TextStore.from_dict(query_texts),
                        TextStore.from_dict(doc_texts), teacher=teacher, source=str(data.path))


def _jsonl_text(value, path: Path, line_no: int, name: str) -> str:
    if isinstance(value, dict):  # {"title", "text"} documents
        value = doc_text(value)
    if not isinstance(value, str) or not value.strip():
        raise D.DataError(f"'{name}' entries must be non-empty strings or {{title, text}} objects",
                          path=path, line=line_no, reason="bad text")
    return value


def _jsonl_group(path: Path, line_no: int, line: str, seen_queries: Dict[str, str]):
    """One line of the generic jsonl: (group, {id: text} of its query and documents, teacher
    scores or None); a bad line raises DataError naming file and line."""
    obj = parse_json_object(path, line_no, line)
    query = _jsonl_text(get_field(obj, "query", path, line_no), path, line_no, "query")
    lists = {}
    for name in ("positives", "negatives"):
        value = obj.get(name, []) if name == "negatives" else get_field(obj, name, path, line_no)
        if not isinstance(value, list):
            raise D.DataError(f"'{name}' must be a list", path=path, line=line_no)
        lists[name] = [_jsonl_text(v, path, line_no, name) for v in value]
    if not lists["positives"]:
        raise D.DataError("no positives", path=path, line=line_no, reason="no positives")
    qid = text_id("q", query)
    if qid in seen_queries:
        raise D.DataError("the same query text appears on two lines; merge them", path=path,
                          line=line_no, reason="duplicate query")
    ids = {name: [text_id("d", t) for t in texts] for name, texts in lists.items()}
    texts = {qid: query}
    for name in ids:
        texts.update(zip(ids[name], lists[name]))
    scores = None
    if obj.get("scores") is not None:
        both = ids["positives"] + ids["negatives"]
        if not isinstance(obj["scores"], list) or len(obj["scores"]) != len(both):
            raise D.DataError(f"'scores' must list {len(both)} numbers (positives, then "
                              "negatives)", path=path, line=line_no, reason="bad scores")
        scores = {d: _score(v, path, line_no) for d, v in zip(both, obj["scores"])}
    return TrainGroup(qid, ids["positives"], ids["negatives"]), texts, scores


def _jsonl_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    """Generic jsonl: {"query", "positives": [..], "negatives": [..], "scores": [..]} per line;
    texts are strings or {title, text}; `scores` (optional) are teacher scores of the positives
    followed by the negatives, in order."""
    path = D.resolve_data(data.path)
    query_texts: Dict[str, str] = {}
    doc_texts: Dict[str, str] = {}
    groups: List[TrainGroup] = []
    for line_no, line in iter_lines(path):
        try:
            group, texts, scores = _jsonl_group(path, line_no, line, query_texts)
        except D.DataError as error:
            D.BadLinePolicy(**read).handle(error)  # raised, or counted when skipping
            continue
        query_texts[group.qid] = texts.pop(group.qid)
        doc_texts.update(texts)
        if scores is not None:
            teacher[group.qid] = scores
        groups.append(group)
    return TrainingPool(groups, TextStore.from_dict(query_texts), TextStore.from_dict(doc_texts),
                        teacher=teacher, source=str(path))


def _score(value, path: Path, line_no: int) -> float:
    return parse_score(value, "score", path, line_no)


def _sentences_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    return sentences_pool(data, teacher, read)


READERS = {"beir": _beir_pool, "msmarco": _msmarco_pool, "triples": _triples_pool,
           "jsonl": _jsonl_pool, "sentences": _sentences_pool}


def build_pool(data: DataArgs, teacher=None, report: "D.SkipReport | None" = None,
               exclude: Sequence[str] = (), finish: bool = True, candidates=None) -> TrainingPool:
    """The groups of `data` (few-shot sampled, teacher scores attached, negatives and negative
    queries mined). With data.on_error=skip, bad records are dropped and counted in `report`.
    Queries in `exclude` (a dev split, EvalArgs.holdout) are removed before the few-shot
    sampling. finish=False leaves the mining to finish_pool, which every process of a
    distributed run must call at the same point (the reading may be done one process at a time).
    `candidates`: data.kind=pseudo's candidate run from twotower.finetune.pseudo.pseudo_candidates."""
    if not data.path:  # a recipe that leaves the data to the command line (gpl)
        raise RecipeError(f"'data.path' is empty: name the {data.kind} training data (a path, or "
                          "a name under $TWOTOWER_DATA), e.g. data.path=<folder>")
    read = {"on_error": data.on_error, "report": report if report is not None else D.SkipReport()}
    # the file's scores stay on disk (a cached table: MS MARCO's ~50 M pairs would be GBs of
    # dicts per process); scores added later go to its in-memory overlay
    scores: "Dict[str, Dict[str, float]] | D.TeacherScores" = {}
    if data.teacher_scores:
        scores = D.load_teacher_scores(data_file(data, data.teacher_scores), **read)
    if data.kind == "pseudo":
        if teacher is None:
            raise ValueError("data.kind=pseudo needs a teacher (teacher.model)")
        pool = pseudo_label_pool(data, teacher, candidates)
        if data.teacher_scores:  # the file's scores win over the pseudo-labeller's
            scores.add_unscored(pool.teacher)
            pool.teacher = scores
    else:
        pool = READERS[data.kind](data, scores, read)
    if exclude:
        held_out = set(exclude)
        before = len(pool.groups)
        pool.groups = select_groups(pool.groups, [i for i, q in enumerate(group_qids(pool.groups))
                                                  if q not in held_out])
        pool.source += f" ({before - len(pool.groups)} dev queries held out)"
        log.info("%d dev queries held out of training (eval.holdout)", before - len(pool.groups))
    if data.max_queries and data.max_queries < len(pool.groups):
        rng = np.random.default_rng(data.sample_seed)
        keep = np.sort(rng.choice(len(pool.groups), data.max_queries, replace=False))
        pool.groups = select_groups(pool.groups, keep)
        pool.source += f" ({data.max_queries} sampled queries, seed {data.sample_seed})"
    if finish:
        finish_pool(pool, data)
    return pool


def finish_pool(pool: TrainingPool, data: DataArgs) -> None:
    """data.mine's hard negatives (the miner ranks every judged query of the data, so the cuts
    above change no query's negatives), then the negative queries drawn from them."""
    _mine_negatives(pool, data)
    if data.n_neg_queries:
        mine_negative_queries(pool, data.n_neg_queries, data.sample_seed,
                              fill_random=data.short_pool == "random")


def mine_negative_queries(pool: TrainingPool, m: int, seed: int, fill_random: bool) -> None:
    """pool.neg_queries[pid] = queries that list pid among their negatives (and do not judge it
    relevant); with fill_random, topped up to m with random training queries fixed per pid (so a
    teacher can score them before training)."""
    positives_of = {g.qid: set(g.positives) for g in pool.groups}
    wanted = {p for g in pool.groups for p in g.positives}
    found: Dict[str, List[str]] = {p: [] for p in wanted}
    for g in pool.groups:
        for pid in g.negatives:
            if pid in found and pid not in positives_of[g.qid]:
                found[pid].append(g.qid)
    # random negative queries come from the training groups only: a BEIR queries file also holds
    # the dev/test queries, whose texts (and unknown relevance) must not enter training
    query_ids = [g.qid for g in pool.groups]
    for pid, qids in found.items():
        if fill_random and len(qids) < m and len(query_ids) > m:
            rng = np.random.default_rng([seed, stable_hash(pid)])
            taken = set(qids)
            for _ in range(20 * m):  # rejection sampling: never a pass over all queries
                q = query_ids[int(rng.integers(len(query_ids)))]
                if q not in taken and pid not in positives_of.get(q, ()):
                    qids.append(q)
                    taken.add(q)
                    if len(qids) >= m:
                        break
        pool.neg_queries[pid] = qids


def required_pairs(pool: TrainingPool, with_neg_queries: bool) -> List[tuple]:
    """(qid, pid) pairs a teacher must score for Margin-MSE over this pool."""
    pairs = []
    for g in pool.groups:
        pairs += [(g.qid, p) for p in g.positives] + [(g.qid, p) for p in g.negatives]
        if with_neg_queries:
            pairs += [(q, p) for p in g.positives for q in pool.neg_queries.get(p, [])]
    return list(dict.fromkeys(pairs))
