"""Training groups (query, 1 positive, k negatives, optional negative queries and teacher scores),
sampled as a pure function of (seed, epoch, group index), in an epoch order that keeps the same
text out of one global batch (no false in-batch negatives), and collated into token tensors.

How the batch order survives sharding: twotower.common.train.epochs' EpochSampler asks the dataset for
`epoch_order(epoch, seed)`; that order is cut sequentially into per-process batches and
Accelerate gives rank r the r-th batch of every run of `world` batches. So one *global batch*
is `global_batch_size` consecutive positions of the order; `epoch_order` packs groups so that no
text (query, positive, negative or negative query) occurs in two groups of one global batch, and
returns a multiple of `global_batch_size` (groups for which no duplicate-free batch is left wait
for the next epoch's order, which is reshuffled).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from twotower.common.data import check_teacher_scores
from twotower.finetune.groups import GroupArrays, TrainGroup
from twotower.finetune.stores import RowIds, TextStore

log = logging.getLogger("twotower.finetune")


@dataclass
class TrainingPool:
    """Everything the sampler draws from, built by twotower.finetune.sources from a recipe's data section."""
    groups: Sequence[TrainGroup]  # a list, or GroupArrays (twotower.finetune.groups)
    queries: TextStore
    docs: TextStore
    teacher: Dict[str, Dict[str, float]] = field(default_factory=dict)  # qid -> pid -> t(q, d)
    neg_queries: Dict[str, List[str]] = field(default_factory=dict)  # pid -> qids (q- of d)
    source: str = "training data"  # for error messages
    # data.mine: what the miner ranks (a RetrievalData: corpus, every judged query, qrels), read
    # when twotower.finetune.sources.finish_pool mines, which every process must call together
    mining_data: Optional[Callable[[], Any]] = None


@dataclass
class Sample:
    index: int
    qid: str
    positive: str
    negatives: List[str]
    neg_queries: List[str]
    # texts_of(sample), when sampling already read them (a group of GroupArrays whose negatives
    # were drawn from its rows): an epoch's order needs them for every group
    digests: Optional[List[int]] = field(default=None, compare=False, repr=False)


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))



def _pick_distinct(n: int, digest_of: Callable[[int], int], banned: set, want: int,
                   rng) -> tuple:
    """Walk a random permutation of a pool of `n`, keeping entries whose text digest is neither
    banned nor already kept, until `want` are kept: (their positions, their digests)."""
    chosen, texts = [], set()
    for j in rng.permutation(n).tolist():
        text = digest_of(j)
        if text not in banned and text not in texts:
            chosen.append(j)
            texts.add(text)
            if len(chosen) == want:
                break
    return chosen, texts


class GroupDataset(Dataset):
    """Map-style dataset of training groups; see the module docstring for the epoch order."""

    def __init__(self, pool: TrainingPool, n_negatives: int, n_neg_queries: int = 0,
                 with_teacher: bool = False, short_pool: str = "random", seed: int = 0,
                 global_batch_size: Optional[int] = None,
                 length_of: Optional[Callable[[Sample], int]] = None):
        if not pool.groups:
            raise ValueError(f"{pool.source}: no training groups")
        self.pool, self.k, self.m = pool, n_negatives, n_neg_queries
        self.with_teacher, self.short_pool, self.seed = with_teacher, short_pool, seed
        self.global_batch_size = global_batch_size
        # data.length_grouped: a sample's padded length (its longest document); None = the
        # duplicate-free random order
        self.length_of = length_of
        self.epoch = 0
        self.left_out_last_epoch = 0
        if with_teacher:
            self._check_teacher()
            if n_neg_queries:
                self._keep_dual_anchored()

    def __len__(self) -> int:
        return len(self.pool.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------------- sampling
    def sample(self, index: int, epoch: int) -> Sample:
        """The group's positive, negatives and negative queries this epoch: a pure function of
        (seed, epoch, index)."""
        group = self.pool.groups[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        positives = self._scored(group.qid, group.positives) if self.with_teacher else group.positives
        drawn = int(rng.integers(len(positives)))
        positive = positives[drawn]
        negatives, known = self._sample_negatives(group, positive, rng) if self.k else ([], [])
        neg_queries = self._sample_neg_queries(group, positive, rng) if self.m else []
        sample = Sample(index, group.qid, positive, negatives, neg_queries)
        if known is not None and group.query_row is not None and not self.with_teacher:
            sample.digests = self._row_digests(group.query_row, group.positive_rows[drawn], known)
            sample.digests += [self.pool.queries.digest(x) for x in neg_queries]
        return sample

    def _row_digests(self, query_row: int, positive_row: int, negatives: List[int]) -> List[int]:
        """texts_of's list from rows: the query's digest, the positive's, the negatives'."""
        q, d = self.pool.queries, self.pool.docs
        return [int(q.digests_of_rows([query_row])[0]), int(d.digests_of_rows([positive_row])[0]),
                *negatives]

    def _scored(self, qid: str, pids: Sequence[str]) -> List[str]:
        known = self.pool.teacher.get(qid, {})
        return [p for p in pids if p in known]

    def _sample_negatives(self, group: TrainGroup, positive: str, rng):
        """(the negatives' ids, their digests when the draw read them, else None)."""
        docs = self.pool.docs
        excluded = set(group.positives)
        if isinstance(group.negatives, RowIds) and not self.with_teacher:
            return self._sample_negative_rows(group, excluded, rng)
        pool = [p for p in group.negatives if p not in excluded]
        if self.with_teacher:
            pool = self._scored(group.qid, pool)
        banned_texts = {docs.digest(p) for p in group.positives}  # texts compared by digest
        chosen, texts = _pick_distinct(len(pool), lambda j: docs.digest(pool[j]), banned_texts,
                                       self.k, rng)
        return self._fill([pool[j] for j in chosen], texts, banned_texts, group, rng,
                          what="negatives", pool_ids=pool, store=docs, excluded=excluded), None

    def _sample_negative_rows(self, group: TrainGroup, excluded: set, rng):
        """`_sample_negatives`' draw (the same pool order, permutation and picks) over a pool
        of store rows: its digests read as one array, ids read for the chosen rows only (every
        group is sampled when an epoch's order is built: 500k for MS MARCO)."""
        docs, negatives = self.pool.docs, group.negatives
        positive_rows = (group.positive_rows if group.positive_rows is not None
                         else [docs.row(p) for p in group.positives])
        rows, digests, banned_texts = self._row_pool(positive_rows, negatives.rows)
        chosen, texts = _pick_distinct(len(rows), digests.__getitem__, banned_texts, self.k, rng)
        picked = self._fill(list(RowIds(rows[chosen], negatives.ids)), texts, banned_texts, group,
                            rng, what="negatives", pool_ids=rows, store=docs, excluded=excluded)
        return picked, [digests[j] for j in chosen] if len(chosen) == self.k else None

    def _row_pool(self, positive_rows, negative_rows):
        """A pool of document rows without the positives': (its rows, their digests, the
        positives' digests)."""
        keep = np.ones(len(negative_rows), dtype=bool)
        for row in positive_rows:  # a query has a positive or two: cheaper than np.isin
            keep &= negative_rows != row
        rows = np.asarray(negative_rows)[keep]
        docs = self.pool.docs
        return (rows, docs.digests_of_rows(rows).tolist(),
                set(docs.digests_of_rows(positive_rows).tolist()))

    def _sample_neg_queries(self, group: TrainGroup, positive: str, rng) -> List[str]:
        queries = self.pool.queries
        pool = [q for q in self.pool.neg_queries.get(positive, []) if q != group.qid]
        if self.with_teacher:
            pool = [q for q in pool if positive in self.pool.teacher.get(q, {})]
        own = queries.digest(group.qid)
        chosen, texts = _pick_distinct(len(pool), lambda j: queries.digest(pool[j]), {own},
                                       self.m, rng)
        return self._fill([pool[j] for j in chosen], texts, {own}, group, rng,
                          what="negative queries", pool_ids=pool, store=queries,
                          excluded={group.qid})

    def _fill(self, chosen, texts, banned_texts, group, rng, what, pool_ids, store, excluded):
        """A pool smaller than asked: random store entries (no teacher), repeats of the scored
        pool (teacher losses need a score for every pair), or an error. A full pool is returned
        as it is."""
        want = self.k if what == "negatives" else self.m
        if len(chosen) == want:
            return chosen
        if self.with_teacher and chosen:
            while len(chosen) < want:  # Margin-MSE needs t(q, d) for every pair: reuse scored ones
                chosen.append(chosen[int(rng.integers(len(chosen)))])
            return chosen
        if self.short_pool == "error" or self.with_teacher:
            raise ValueError(
                f"{self.pool.source}: query {group.qid!r} has {len(chosen)} usable {what} "
                f"(pool {len(pool_ids)}{', with teacher scores' if self.with_teacher else ''}) "
                f"but {want} are asked; lower data.n_negatives / data.n_neg_queries"
                + ("" if self.with_teacher else " or set data.short_pool=random"))
        tries = 0
        while len(chosen) < want:
            tries += 1
            if tries > 100 * want + 1000:
                raise ValueError(f"{self.pool.source}: cannot find {want} distinct random {what} "
                                 f"for query {group.qid!r} (only {len(store)} entries)")
            candidate = store.ids[int(rng.integers(len(store)))]
            text = store.digest(candidate)
            if candidate in excluded or text in banned_texts or text in texts:
                continue
            chosen.append(candidate)
            texts.add(text)
        return chosen

    def _keep_dual_anchored(self) -> None:
        """With a teacher, a document-anchored (dual) loss needs t(q-, p) for a negative query q-
        of the sampled positive p, and a scored pool cannot be filled at random: keep the
        positives that have such a query, drop (and count) the groups left with none -- found
        here, not at whatever step first samples such a group. None left is an error."""
        queries, teacher = self.pool.queries, self.pool.teacher

        def anchored(group: TrainGroup, p: str) -> bool:
            own = queries.digest(group.qid)
            return any(q != group.qid and p in teacher.get(q, {}) and queries.digest(q) != own
                       for q in self.pool.neg_queries.get(p, []))

        kept, positives_left_out = [], 0
        for group in self.pool.groups:
            usable = [p for p in self._scored(group.qid, group.positives) if anchored(group, p)]
            positives_left_out += len(group.positives) - len(usable)
            if usable:
                kept.append(TrainGroup(group.qid, usable, group.negatives))
        if not kept:
            raise ValueError(f"{self.pool.source}: no positive of any query is a mined negative "
                             "of another query with a teacher score, so data.n_neg_queries "
                             "cannot be met; set data.n_neg_queries=0")
        if len(kept) < len(self.pool.groups) or positives_left_out:
            log.warning("%s: %d of %d queries kept (%d positives left out): data.n_neg_queries "
                        "needs a negative query with a teacher score for the positive, and the "
                        "others have none", self.pool.source, len(kept), len(self.pool.groups),
                        positives_left_out)
        self.pool.groups = kept

    def _check_teacher(self) -> None:
        """Every group needs a teacher score for at least one positive (Margin-MSE anchors)."""
        unscored = [g for g in self.pool.groups if not self._scored(g.qid, g.positives)]
        check_teacher_scores(self.pool.teacher, [(g.qid, p) for g in unscored for p in g.positives],
                             source=f"{self.pool.source} (teacher scores)")

    # ---------------------------------------------------------------------- epoch order
    def texts_of(self, s: Sample) -> List[int]:
        """The digests (TextStore.digest) of a sample's texts: equal texts, equal digests."""
        if s.digests is not None:
            return s.digests
        q, d = self.pool.queries, self.pool.docs
        return ([q.digest(s.qid), d.digest(s.positive)] + [d.digest(p) for p in s.negatives]
                + [q.digest(x) for x in s.neg_queries])

    def _digest_rows(self, epoch: int) -> np.ndarray:
        """Row i: the digests of group i's texts this epoch (texts_of), one uint64 array for all
        groups. 64-bit digests, not the texts (500k MS MARCO groups would hold ~1.5 M passages),
        and one array, not a set per group (~400 bytes each: 0.2 GB a process at 500k groups);
        BLAKE2b is the same in every process (str hash() is not), so every rank builds one order."""
        width = 2 + self.k + self.m  # _fill makes every sample this wide, or raises
        rows = np.empty((len(self), width), dtype=np.uint64)
        arrays = isinstance(self.pool.groups, GroupArrays) and not self.with_teacher \
            and not self.m and (self.pool.groups.negative_rows is not None or not self.k)
        for i in range(len(self)):
            digests = self._drawn_digests(i, epoch) if arrays else None
            rows[i] = digests if digests is not None else self.texts_of(self.sample(i, epoch))
        return rows

    def _drawn_digests(self, index: int, epoch: int) -> Optional[List[int]]:
        """texts_of(sample(index, epoch)) read from the arrays of GroupArrays alone: the same
        draws (positive, then the row pool's picks) without reading an id; None for a short
        pool (its random filling draws ids: sample it)."""
        groups = self.pool.groups
        rng = np.random.default_rng([self.seed, epoch, index])
        positives = groups.positive_rows[groups.positive_offsets[index]:
                                         groups.positive_offsets[index + 1]]
        drawn = int(rng.integers(len(positives)))
        picked: List[int] = []
        if self.k:
            rows, digests, banned = self._row_pool(positives, groups.negatives_of(index))
            chosen, _ = _pick_distinct(len(rows), digests.__getitem__, banned, self.k, rng)
            if len(chosen) < self.k:
                return None
            picked = [digests[j] for j in chosen]
        return self._row_digests(int(groups.query_rows[index]), int(positives[drawn]), picked)

    def epoch_order(self, epoch: int, seed: int) -> List[int]:
        """Group indices for `epoch`: global batches without a repeated text (module docstring)."""
        if seed != self.seed:
            raise ValueError(f"the trainer's seed {seed} differs from the dataset's {self.seed}")
        size = self.global_batch_size
        if not size:
            raise ValueError("GroupDataset.global_batch_size is not set (per-device batch x processes)")
        if size > len(self):
            raise ValueError(f"{self.pool.source}: {len(self)} groups cannot fill one global batch "
                             f"of {size}")
        if self.length_of is not None:
            return self._length_grouped_order(epoch, seed, size)
        remaining = dict.fromkeys(np.random.default_rng([seed, epoch]).permutation(len(self)).tolist())
        texts = self._digest_rows(epoch)
        order: List[int] = []
        left_out: List[int] = []
        while len(remaining) >= size:
            batch, seen = [], set()
            for i in remaining:
                mine = texts[i].tolist()
                if seen.isdisjoint(mine):
                    batch.append(i)
                    seen.update(mine)
                    if len(batch) == size:
                        break
            if len(batch) < size:
                # no duplicate-free batch starts with the first waiting group: it sits this
                # epoch out (the next epoch's order is reshuffled) and the rest are tried
                left_out.append(next(iter(remaining)))
                del remaining[left_out[-1]]
                continue
            for i in batch:
                del remaining[i]
            order.extend(batch)
        self.left_out_last_epoch = len(remaining) + len(left_out)
        if self.left_out_last_epoch:
            log.info("epoch %d: %d of %d groups wait for the next epoch (no duplicate-free "
                     "batch of %d left for them)", epoch, self.left_out_last_epoch, len(self), size)
        if not order:
            raise ValueError(f"{self.pool.source}: no global batch of {size} groups without a "
                             "repeated text can be formed; lower the batch size")
        return order

    def _length_grouped_order(self, epoch: int, seed: int, size: int) -> List[int]:
        """transformers' LengthGroupedSampler for global batches: the shuffled groups cut into
        mega-batches of min(n / (4 x size), 50) global batches, each sorted by length, longest
        first, so one global batch holds groups of similar length and pads little; the batch
        holding the longest group goes first (memory fails at once, not hours in). Any text may
        repeat within a batch: only losses without in-batch terms (Margin-MSE) may use this
        order, which FinetuneRecipe.validate enforces."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self)).tolist()
        usable = len(order) // size * size
        self.left_out_last_epoch = len(order) - usable
        length = {i: self.length_of(self.sample(i, epoch)) for i in order[:usable]}
        mega = size * max(min(len(order) // (4 * size), 50), 1)
        grouped: List[int] = []
        for start in range(0, usable, mega):
            grouped += sorted(order[start:min(start + mega, usable)], key=lambda i: -length[i])
        batches = [grouped[b:b + size] for b in range(0, usable, size)]
        longest = max(range(len(batches)), key=lambda b: max(length[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
        return [i for batch in batches for i in batch]

    # --------------------------------------------------------------------------- items
    def __getitem__(self, index: int) -> dict:
        s = self.sample(int(index), self.epoch)
        q, d, teacher = self.pool.queries, self.pool.docs, self.pool.teacher
        item = {"qid": s.qid, "query": q[s.qid], "positive": d[s.positive],
                "negatives": [d[p] for p in s.negatives],
                "neg_queries": [q[x] for x in s.neg_queries],
                "doc_ids": [s.positive, *s.negatives], "neg_query_ids": list(s.neg_queries)}
        if self.with_teacher:
            scores = teacher[s.qid]
            item["teacher_pos"] = scores[s.positive]
            item["teacher_neg"] = [scores[p] for p in s.negatives]
            item["teacher_neg_queries"] = [teacher[x][s.positive] for x in s.neg_queries]
        return item


class GroupCollator:
    """Items -> token tensors (query tower for queries and negative queries, document tower for
    documents: positives first, then each group's k negatives) + teacher scores + ids.

    With `tokens` (twotower.finetune.tokens.TokenCache, pretokenised) a step only pads kept ids; without,
    each batch's texts are tokenised here."""

    def __init__(self, tokenize: Callable[..., dict], tokens=None):
        self.tokenize = tokenize  # twotower.common.model.encoder.Encoder.tokenize (applies the tower prefixes)
        self.tokens = tokens

    @staticmethod
    def _ids(items: List[dict], part: str) -> List[str]:
        """The text ids of one part of the batch, in the order of its texts."""
        if part == "query":
            return [it["qid"] for it in items]
        if part == "doc":
            return [it["doc_ids"][0] for it in items] + [i for it in items for i in it["doc_ids"][1:]]
        return [i for it in items for i in it["neg_query_ids"]]

    def __call__(self, items: List[dict]) -> dict:
        batch: dict = {"ids": [it["qid"] for it in items]}
        neg_queries = [t for it in items for t in it["neg_queries"]]
        parts = {  # name -> (tower, texts); documents: positives first, then negatives
            "query": ("query", [it["query"] for it in items]),
            "doc": ("doc", [it["positive"] for it in items] + [t for it in items for t in it["negatives"]]),
        }
        if neg_queries:
            parts["negq"] = ("query", neg_queries)
        for prefix, (tower, texts) in parts.items():
            tokens = (self.tokens.batch(self._ids(items, prefix), tower) if self.tokens is not None
                      else self.tokenize(texts, tower=tower))
            batch[f"{prefix}_input_ids"] = tokens["input_ids"]
            batch[f"{prefix}_attention_mask"] = tokens["attention_mask"]
        if "teacher_pos" in items[0]:
            batch["teacher_pos"] = torch.tensor([it["teacher_pos"] for it in items])
            batch["teacher_neg"] = torch.tensor([it["teacher_neg"] for it in items]).reshape(len(items), -1)
            if neg_queries:
                batch["teacher_neg_queries"] = torch.tensor(
                    [it["teacher_neg_queries"] for it in items]).reshape(len(items), -1)
        return batch
