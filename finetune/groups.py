"""Training groups: TrainGroup (a query, its positives, the pool its hard negatives come from), and
GroupArrays, the same groups held as int32 rows of the query and document stores.

MS MARCO has ~500k training groups. As TrainGroup objects with string ids, a RowIds view each and
the qrels' dict of dicts they were read from, that was ~0.7 GB in every process (measured at
8.8 M passages); as arrays it is ~10 MB, and the hard-negative pools stay views of the
memory-mapped rows of twotower.finetune.stores.listed_rows. A group is made into a TrainGroup
when it is read (`groups[i]`), so the sampler and the losses see the same objects as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from twotower.finetune.stores import RowIds


@dataclass
class TrainGroup:
    qid: str
    positives: List[str]  # doc ids
    # doc ids: the pool hard negatives come from (a list, or RowIds: doc rows stored as int32)
    negatives: Sequence[str] = field(default_factory=list)
    # the query's and the positives' store rows, when the group was read from GroupArrays (the
    # sampler then reads their digests without looking the ids up again)
    query_row: Optional[int] = field(default=None, compare=False, repr=False)
    positive_rows: Optional[np.ndarray] = field(default=None, compare=False, repr=False)


def gather_runs(rows: np.ndarray, offsets: np.ndarray, picks: np.ndarray):
    """The runs rows[offsets[i]:offsets[i + 1]] of each i in `picks`, concatenated, and their
    offsets."""
    lengths = offsets[picks + 1] - offsets[picks]
    new = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    where = np.repeat(offsets[picks] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return np.asarray(rows)[where], new


class GroupArrays(Sequence):
    """Read-only groups over a query and a document store: group i is the query at row
    query_rows[i], the documents at positive_rows[positive_offsets[i]:positive_offsets[i + 1]]
    and, as its negative pool, negative_rows[start:stop] for (start, stop) = negative_bounds[i]
    (a view: negative_rows may be a memory-mapped file). Reading one builds its TrainGroup;
    changing that object does not change the arrays (a caller that edits groups makes a list)."""

    def __init__(self, queries, docs, query_rows, positive_rows, positive_offsets,
                 negative_rows: Optional[np.ndarray] = None,
                 negative_bounds: Optional[np.ndarray] = None):
        self.queries, self.docs = queries, docs
        self.query_rows = np.asarray(query_rows, dtype=np.int32)
        self.positive_rows = np.asarray(positive_rows, dtype=np.int32)
        self.positive_offsets = np.asarray(positive_offsets, dtype=np.int64)
        self.negative_rows = negative_rows
        self.negative_bounds = (np.zeros((len(self.query_rows), 2), dtype=np.int64)
                                if negative_bounds is None else np.asarray(negative_bounds))
        if len(self.positive_offsets) != len(self.query_rows) + 1 or \
                self.negative_bounds.shape != (len(self.query_rows), 2):
            raise ValueError("GroupArrays: the arrays disagree on the number of groups")

    def __len__(self) -> int:
        return len(self.query_rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"group {i} out of range for {len(self)} groups")
        positives = self.positive_rows[self.positive_offsets[i]:self.positive_offsets[i + 1]]
        negatives = (RowIds(self.negatives_of(i), self.docs.ids)
                     if self.negative_rows is not None else [])
        row = int(self.query_rows[i])
        return TrainGroup(self.queries.ids[row], list(RowIds(positives, self.docs.ids)), negatives,
                          row, positives)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def negatives_of(self, i: int) -> np.ndarray:
        """Group i's negative pool as store rows (a view; empty without a hard-negatives file)."""
        if self.negative_rows is None:
            return np.empty(0, dtype=np.int32)
        start, stop = self.negative_bounds[i]
        return self.negative_rows[start:stop]

    def qids(self) -> List[str]:
        return list(RowIds(self.query_rows, self.queries.ids))

    def select(self, picks) -> "GroupArrays":
        """The groups at `picks` (indices), in that order."""
        picks = np.asarray(picks, dtype=np.int64)
        rows, offsets = gather_runs(self.positive_rows, self.positive_offsets, picks)
        return GroupArrays(self.queries, self.docs, self.query_rows[picks], rows, offsets,
                           self.negative_rows, self.negative_bounds[picks])


def select_groups(groups: Sequence[TrainGroup], picks) -> Sequence[TrainGroup]:
    """groups[i] for i in picks: GroupArrays stay arrays, a list stays a list."""
    if isinstance(groups, GroupArrays):
        return groups.select(picks)
    return [groups[int(i)] for i in picks]


def group_qids(groups: Sequence[TrainGroup]) -> List[str]:
    return groups.qids() if isinstance(groups, GroupArrays) else [g.qid for g in groups]
