"""Hard negatives from a jsonl file (MS MARCO's `msmarco-hard-negatives.jsonl.gz` layout, read by
twotower.common.data.load_hard_negatives) attached to training groups held as arrays
(twotower.finetune.groups.GroupArrays): each group's pool a range of the collection rows the
file lists (twotower.finetune.stores.listed_rows, memory-mapped), or of the rows kept by the
recipe's per-system cap and teacher-margin filter.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from twotower.common import data as D
from twotower.finetune.args import DataArgs
from twotower.finetune.data_files import _file
from twotower.finetune.groups import GroupArrays, gather_runs
from twotower.finetune.stores import TextStore, listed_rows

log = logging.getLogger("twotower.finetune")
NEGATIVES_BLOCK = 4096  # hard-negative lines read together


def _line_positives(table) -> np.ndarray:
    """How many positives each hard-negatives line lists (its pos column's lengths)."""
    counts = [len(p) for block in table.select_columns(["pos"]).iter(batch_size=NEGATIVES_BLOCK)
              for p in block["pos"]]
    return np.asarray(counts, dtype=np.int64)


def _unknown_passages(table, rows, offsets, path, read) -> np.ndarray:
    """Lines naming a passage outside the collection: raised, or counted with skip (the line is
    then left out). Returns a mask of the lines kept."""
    kept = np.ones(len(table), dtype=bool)
    unknown = np.flatnonzero(np.asarray(rows) < 0)
    for line in np.unique(np.searchsorted(offsets, unknown, side="right") - 1).tolist():
        record = table[line]
        known = np.asarray(rows[offsets[line]:offsets[line + 1]])
        passage = (record["pos"] + record["neg"])[int(np.flatnonzero(known < 0)[0])]
        D.BadLinePolicy(**read).handle(D.DataError(  # raised, or counted when skipping
            f"query {record['qid']!r}: passage {passage!r} is not in the corpus",
            path=path, reason="unknown passage"))
        kept[line] = False
    return kept


def attach_negatives(groups: GroupArrays, data: DataArgs, root: Optional[Path], docs: TextStore,
                      queries: TextStore, teacher: Dict[str, Dict[str, float]], read: Dict,
                      use_file_positives: bool = False) -> GroupArrays:
    """Negatives (and, for msmarco without qrels, positives) from a hard-negatives jsonl, with
    the per-system cap and the teacher-margin false-negative filter of the recipe. The passages'
    corpus rows are looked up once per (file, collection) (listed_rows); a group's pool is a
    range of those mapped rows when there is no filter or cap, else a range of the rows the
    filter kept (the reader refuses a query listed on two lines)."""
    if not data.hard_negatives:
        return groups
    path = D.resolve_data(_file(root, data.hard_negatives) if root else data.hard_negatives)
    table = D.load_hard_negatives(path, systems=data.negative_systems or None, **read)
    rows, offsets = listed_rows(table, ("pos", "neg"), docs)  # looked up once per data version
    n_pos = _line_positives(table)
    kept = _unknown_passages(table, rows, offsets, path, read)
    line_qids = [q for block in table.select_columns(["qid"]).iter(batch_size=NEGATIVES_BLOCK)
                 for q in block["qid"]]
    line_query = queries.rows_of(line_qids)
    group_of_query = np.full(len(queries), -1, dtype=np.int64)
    group_of_query[groups.query_rows] = np.arange(len(groups))
    line_group = np.where(line_query >= 0, group_of_query[np.maximum(line_query, 0)], -1)
    if use_file_positives:  # a group for each query the file lists, with the line's positives
        new = kept & (line_group < 0)
        unknown = np.flatnonzero(new & (line_query < 0))
        if len(unknown):
            raise D.DataError(f"query {line_qids[int(unknown[0])]!r} has no text in "
                              f"{data.queries}", path=root)
        first = np.flatnonzero(new)  # file order; a query is on one line (the reader checks)
        positives, positive_offsets = gather_runs(rows, offsets, first)
        positives = positives[_within_prefix(positive_offsets, n_pos[first])]
        lengths = n_pos[first]
        groups = GroupArrays(queries, docs, np.concatenate([groups.query_rows, line_query[first]]),
                             np.concatenate([groups.positive_rows, positives]),
                             np.concatenate([groups.positive_offsets, groups.positive_offsets[-1]
                                             + np.cumsum(lengths, dtype=np.int64)]))
        group_of_query[line_query[first]] = np.arange(len(groups) - len(first), len(groups))
        line_group = np.where(line_query >= 0, group_of_query[np.maximum(line_query, 0)], -1)
    del line_qids
    lines = np.flatnonzero(kept & (line_group >= 0))  # one per group that has a line
    start = offsets[lines] + n_pos[lines]
    if not (data.teacher_margin is not None or data.negatives_per_system):
        bounds = np.zeros((len(groups), 2), dtype=np.int64)
        bounds[line_group[lines]] = np.stack([start, offsets[lines + 1]], axis=1)
        return GroupArrays(queries, docs, groups.query_rows, groups.positive_rows,
                           groups.positive_offsets, rows, bounds)
    pool, bounds, dropped = _filtered_pools(groups, line_group[lines], lines, table, rows, start,
                                            offsets, data, teacher)
    if dropped:
        log.info("%s: teacher margin %.2f removed %d likely false negatives", path,
                 data.teacher_margin, dropped)
    return GroupArrays(queries, docs, groups.query_rows, groups.positive_rows,
                       groups.positive_offsets, pool, bounds)


def _within_prefix(offsets: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Mask over runs concatenated at `offsets`: the first prefix[i] entries of run i."""
    lengths = np.diff(offsets)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return position < np.repeat(prefix, lengths)


def _filtered_pools(groups: GroupArrays, group_ids, lines, table, rows, start, offsets,
                    data: DataArgs, teacher):
    """data.teacher_margin / data.negatives_per_system applied to the line chosen for each group
    (group_ids[i] takes lines[i], ascending; its negatives start at rows[start[i]]), reading
    the file a block of lines at a time: (kept rows, (start, stop) of each group's among them,
    negatives the margin dropped)."""
    columns = ["qid"] + (["neg"] if data.teacher_margin is not None else []) \
        + (["neg_system"] if data.negatives_per_system else [])
    selected = table.select_columns(columns)
    bounds = np.zeros((len(groups), 2), dtype=np.int64)
    chunks, filled, dropped = [], 0, 0
    for first in range(0, len(table), NEGATIVES_BLOCK):
        lo, hi = np.searchsorted(lines, [first, first + NEGATIVES_BLOCK])
        if lo == hi:
            continue
        block, kept = selected[first:first + NEGATIVES_BLOCK], []
        for k in range(lo, hi):
            j, group = int(lines[k]) - first, groups[int(group_ids[k])]
            neg_rows = np.asarray(rows[start[k]:offsets[lines[k] + 1]])
            bound, scores, neg = None, {}, block["neg"][j] if "neg" in block else None
            if data.teacher_margin is not None:
                scores = teacher.get(group.qid, {})
                missing = [p for p in group.positives + list(neg) if p not in scores]
                if missing:
                    raise D.DataError(f"data.teacher_margin: no teacher score for query "
                                      f"{group.qid!r}, passage {missing[0]!r}",
                                      path=data.teacher_scores)
                bound = min(scores[p] for p in group.positives) - data.teacher_margin
            systems = block["neg_system"][j] if "neg_system" in block else [""] * len(neg_rows)
            taken: Dict[str, int] = {}
            begin = filled + len(kept)
            for n, (system, row) in enumerate(zip(systems, neg_rows.tolist())):
                if bound is not None and scores[neg[n]] > bound:
                    dropped += 1
                    continue
                if data.negatives_per_system and taken.get(system, 0) >= data.negatives_per_system:
                    continue
                taken[system] = taken.get(system, 0) + 1
                kept.append(row)
            bounds[int(group_ids[k])] = (begin, filled + len(kept))
        chunks.append(np.asarray(kept, dtype=np.int32))
        filled += len(kept)
    pool = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    return pool, bounds, dropped
