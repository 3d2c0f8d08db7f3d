"""A teacher that scores (query, passage) pairs in batches — a cross-encoder
(`AutoModelForSequenceClassification`, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2) or a
bi-encoder (twotower.common.model.encoder.Encoder, inner product) — with an on-disk sqlite cache keyed by
(teacher id, sha1(query), sha1(passage)), so a rerun scores nothing twice.

The teacher id is kind + model name + max_length + a fingerprint of a local model folder
(config.json contents, weight file names/sizes/mtimes): retrained weights in the same folder
never hit stale scores.
"""
from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from twotower.common.data.progress import progress_bar
from twotower.common.model.encoder import Encoder
from twotower.common.model.loading import check_model
from twotower.finetune.args import TeacherArgs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
KINDS = ("cross_encoder", "bi_encoder")  # a model's scores; fusion_teacher.py composes a bi_encoder


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def model_fingerprint(path: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        return "hub"  # a hub id: its name (and revision pinning by the user) identifies it
    digest = hashlib.sha1()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for f in sorted(folder.rglob("*")):
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            digest.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class ScoreCache:
    """sqlite table (teacher, qhash, phash) -> score; safe to share between runs."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=timeout)
        # Several processes (the ranks of one launch, or two runs sharing a cache) may open a new
        # file at once. Switching it to WAL takes an exclusive lock, and sqlite answers a second
        # opener "database is locked" at once, without waiting for the busy timeout: retry.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("CREATE TABLE IF NOT EXISTS scores (teacher TEXT, qhash TEXT, "
                                "phash TEXT, score REAL, PRIMARY KEY (teacher, qhash, phash))")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    self.db.close()
                    raise sqlite3.OperationalError(f"teacher score cache {self.path}: {exc}") from exc
                time.sleep(random.uniform(0.01, 0.1))

    def get(self, teacher: str, keys: Sequence[Tuple[str, str]]) -> List[Optional[float]]:
        out: List[Optional[float]] = []
        cur = self.db.cursor()
        for q, p in keys:
            row = cur.execute("SELECT score FROM scores WHERE teacher=? AND qhash=? AND phash=?",
                              (teacher, q, p)).fetchone()
            out.append(None if row is None else float(row[0]))
        return out

    def put(self, teacher: str, keys: Sequence[Tuple[str, str]], scores: Iterable[float]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                                [(teacher, q, p, float(s)) for (q, p), s in zip(keys, scores)])

    def close(self) -> None:
        self.db.close()


class Teacher:
    """score(queries, passages) -> np.ndarray of t(q, p), computing only uncached pairs."""

    def __init__(self, args: TeacherArgs, cache_path: str | Path | None = None,
                 device: str | torch.device = "cpu", key: str = "teacher.model"):
        """`key`: how the model was named (recipe key or flag), for the error when the model
        cannot be found -- raised here, before any scoring, not at the first batch."""
        if not args.model:
            raise ValueError(f"{key} is empty")
        if args.kind not in KINDS:  # anything else once ran silently as a bi-encoder
            raise ValueError(f"teacher kind {args.kind!r} (for {key}) must be one of {KINDS}")
        self.args, self.device = args, torch.device(device)
        self.path = check_model(args.model, key)
        self.id = json.dumps([args.kind, args.model, args.max_length, model_fingerprint(self.path)]
                             + (["bf16"] if args.bf16 else []))  # fp32 keys as before
        self.cache = ScoreCache(cache_path) if cache_path else None
        self._model = None
        self.computed = 0  # pairs run through the model by this object
        self.cache_hits = 0

    # ----------------------------------------------------------------------- model
    def _load(self):
        if self._model is not None:
            return self._model
        if self.args.kind == "cross_encoder":
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path)
        else:
            self._model = Encoder.load(self.path)
        self._model.to(self.device).eval()
        return self._model

    @torch.inference_mode()
    def _cross_encoder_scores(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        model = self._load()
        out = np.zeros(len(queries), dtype=np.float64)
        order = np.argsort([-(len(q) + len(p)) for q, p in zip(queries, passages)], kind="stable")
        bar = progress_bar(len(order), "teacher scores", "pair")
        for start in range(0, len(order), self.args.batch_size):
            idx = order[start:start + self.args.batch_size]
            batch = self._tokenizer([queries[i] for i in idx], [passages[i] for i in idx],
                                    padding=True, truncation="only_second",
                                    max_length=self.args.max_length, return_tensors="pt")
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.bf16):
                logits = model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
            # one label: the relevance logit; two labels: log-odds of "relevant" (label 1)
            scores = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            out[idx] = scores.cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out

    def _bi_encoder_scores(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        model = self._load()
        uq, up = list(dict.fromkeys(queries)), list(dict.fromkeys(passages))
        with model.inference_options(bf16=self.args.bf16):
            eq = model.encode(uq, tower="query", batch_size=self.args.batch_size,
                              max_length=self.args.max_length, progress=True)
            ep = model.encode(up, tower="doc", batch_size=self.args.batch_size,
                              max_length=self.args.max_length, progress=True)
        rq, rp = {t: i for i, t in enumerate(uq)}, {t: i for i, t in enumerate(up)}
        return np.array([float(eq[rq[q]] @ ep[rp[p]]) for q, p in zip(queries, passages)])

    # ----------------------------------------------------------------------- scoring
    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        keys = [(_sha1(q), _sha1(p)) for q, p in zip(queries, passages)]
        cached = self.cache.get(self.id, keys) if self.cache else [None] * len(keys)
        todo = [i for i, s in enumerate(cached) if s is None]
        self.cache_hits += len(keys) - len(todo)
        if todo:
            run = (self._cross_encoder_scores if self.args.kind == "cross_encoder"
                   else self._bi_encoder_scores)
            fresh = run([queries[i] for i in todo], [passages[i] for i in todo])
            self.computed += len(todo)
            if self.cache:
                self.cache.put(self.id, [keys[i] for i in todo], fresh)
            for i, s in zip(todo, fresh):
                cached[i] = float(s)
        return np.asarray(cached, dtype=np.float64)

    def fill_pool(self, pool, pairs: Sequence[Tuple[str, str]]) -> int:
        """Score the (qid, pid) pairs the pool has no teacher score for; returns how many."""
        missing = [(q, p) for q, p in pairs if p not in pool.teacher.get(q, {})]
        if missing:
            scores = self.score([pool.queries[q] for q, _ in missing],
                                [pool.docs[p] for _, p in missing])
            for (q, p), s in zip(missing, scores):
                pool.teacher.setdefault(q, {})[p] = float(s)
        return len(missing)

    def close(self) -> None:
        if self.cache:
            self.cache.close()
