"""Hard negatives from BM25 (common/eval/bm25.py), a dense model (common/eval/search.py, faiss)
or both fused (--retriever hybrid --fusion rrf|wsum, common/eval/fusion.py), written in the
hard-negatives jsonl layout {"qid", "pos": [pids], "neg": {system: [pids]}}.

    python -m twotower.finetune.mine --data scifact --split train --retriever bm25 --output negs.jsonl
    python -m twotower.finetune.mine --data msmarco_sample --retriever dense \
        --model bundled:all-MiniLM-L6-v2 --skip-top 3 --window 30 --n 10 --output negs.jsonl
    accelerate launch --multi_gpu --num_processes 2 -m twotower.finetune.mine ... --retriever dense
        (each process encodes a slice of the corpus and queries; BM25 ranks on one process;
        one process writes the file)

Per query: retrieve `depth` documents, drop every judged-relevant document (and any document
whose text equals a positive's, and the document with the query's own id, as BEIR's evaluation
ignores it), keep the rank window [skip_top, skip_top + window) of what is
left (skipping the top few avoids unlabelled positives; Qu et al. 2021 and Moreira et al. 2024,
NV-Retriever, discuss why), drop candidates a false-negative filter rejects, then sample `n`
of the window with a generator seeded by (seed, query id), listed in rank order.

False-negative filters (each optional):
  --teacher-margin M  keep d- only if t(q, d-) < min_pos t(q, d+) - M (a cross-encoder teacher)
  --max-pos-ratio R   keep d- only if s(q, d-) < R * min_pos s(q, d+) (NV-Retriever's
                      TopK-PercPos, R = 0.95 there; s is the mining retriever's score)
  --max-score S       keep d- only if s(q, d-) < S (an absolute similarity ceiling)

Dense encoding: --bf16 (bf16 autocast) and --compile (torch.compile with weight freezing), as in
the evaluation CLI; --shards DIR keeps the corpus embeddings on disk (a corpus past RAM, e.g. all of
MS MARCO: common/eval/corpus_shards.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from twotower.common.data.io import write_text_atomic
from twotower.common.data.ids import IdColumn, IdIndex
from twotower.common.eval.bm25 import BM25Index
from twotower.common.eval.corpus_shards import encode_corpus_shards, search_parts, take_rows
from twotower.common.eval.evaluate import _corpus_rows, judged_queries, load_eval_data
from twotower.common.eval.fusion import fuse
from twotower.common.eval.search import dense_search
from twotower.common.eval.sharded import encode_sharded, join_processes, process_device
from twotower.common.eval.shards import run_from_rows
from twotower.common.model.distributed import (broadcast_object, is_distributed, is_main,
                                                leave_processes, world_size)
from twotower.common.model.encoder import Encoder
from twotower.finetune.args import TeacherArgs
from twotower.finetune.data import TextStore, stable_hash
from twotower.finetune.teacher import Teacher

log = logging.getLogger("twotower.mine")
RETRIEVERS = ("bm25", "dense", "hybrid")


@dataclass
class MineArgs:
    retriever: str = "bm25"  # bm25 | dense | hybrid (BM25 + dense fused)
    model: str = ""  # dense retriever (Encoder.load)
    fusion: str = "rrf"  # hybrid: rrf | wsum (common/eval/fusion.py)
    dense_weight: float = 0.5  # hybrid wsum: (1 - w) BM25 + w dense, min-max normalised
    depth: int = 100
    skip_top: int = 0
    window: int = 0  # 0 = everything after skip_top
    n: int = 20
    seed: int = 0
    system: str = ""  # name in "neg": {system: [...]}; "" = the retriever's name
    teacher: str = ""
    teacher_kind: str = "cross_encoder"
    teacher_margin: Optional[float] = None
    max_pos_ratio: Optional[float] = None
    max_score: Optional[float] = None
    teacher_cache: str = ""
    batch_size: int = 64
    bf16: bool = False  # dense: encode under bf16 autocast
    compile: bool = False  # dense: encode with torch.compile + weight freezing
    shards: str = ""  # dense: corpus embeddings as on-disk shards here (common/eval/corpus_shards)
    shards_dtype: str = "float16"
    stats: Dict[str, int] = field(default_factory=dict)


def retrieve(data, qids: List[str], qtexts: List[str], args: MineArgs, positives):
    """(run {qid: {pid: score}} of depth `args.depth`, {qid: {pid: score}} of the positives;
    hybrid: BM25 and dense fused by common/eval/fusion.py, no positive scores: a fused score has
    no scale the --max-pos-ratio / --max-score filters could use, so they are refused)."""
    if args.retriever not in RETRIEVERS:
        raise ValueError(f"--retriever must be one of {RETRIEVERS}, got {args.retriever!r}")
    if args.retriever != "bm25" and not args.model:
        raise ValueError(f"--retriever {args.retriever} needs --model")
    if args.retriever == "bm25":
        if args.shards:
            raise ValueError("--shards holds dense embeddings: not with --retriever bm25")
        index = BM25Index(data.corpus)
        return (index.search(qids, qtexts, args.depth),
                index.score_candidates(qids, qtexts, positives))
    if args.retriever == "hybrid":
        if args.max_pos_ratio is not None or args.max_score is not None:
            raise ValueError("--max-pos-ratio and --max-score filter on a retriever's own scores; "
                             "a hybrid (fused) score has none: use --teacher-margin, or mine "
                             "with bm25 or dense")
        sparse = BM25Index(data.corpus).search(qids, qtexts, args.depth)
        dense, _ = _dense(data, qids, qtexts, args, positives)
        fused = fuse(sparse, dense, args.fusion, args.dense_weight, depth=args.depth)
        return fused, {q: {} for q in qids}
    return _dense(data, qids, qtexts, args, positives)


def _dense(data, qids: List[str], qtexts: List[str], args: MineArgs, positives):
    encoder = Encoder.load(args.model).to(process_device())
    encoder.encode_bf16, encoder.encode_compile = args.bf16, args.compile
    if args.shards:
        return _dense_shards(encoder, data, qids, qtexts, args, positives)
    doc_ids, rows = _corpus_rows(data)
    # under `accelerate launch` every process encodes its slice of the corpus and of the queries
    doc_emb = encode_sharded(lambda part: encoder.encode_corpus(part, batch_size=args.batch_size), rows)
    query_emb = encode_sharded(
        lambda part: encoder.encode_queries(part, batch_size=args.batch_size), qtexts)
    run = dense_search(query_emb, doc_emb, qids, doc_ids, k=args.depth, similarity=encoder.similarity)
    if encoder.similarity == "cos":
        doc_emb = doc_emb / np.linalg.norm(doc_emb, axis=1, keepdims=True).clip(1e-12)
        query_emb = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    row = {d: i for i, d in enumerate(doc_ids)}
    pos_scores = {q: {p: float(doc_emb[row[p]] @ query_emb[i]) for p in positives[q]}
                  for i, q in enumerate(qids)}
    return run, pos_scores


def _dense_shards(encoder, data, qids: List[str], qtexts: List[str], args: MineArgs, positives):
    """_dense for a corpus past RAM: its embeddings on disk (reused while they match), searched
    exactly shard by shard; the positives' embeddings read back from the shards."""
    parts, _ = encode_corpus_shards(encoder, data.corpus, args.shards, batch_size=args.batch_size,
                                    dtype=args.shards_dtype)
    query_emb = encode_sharded(
        lambda part: encoder.encode_queries(part, batch_size=args.batch_size), qtexts)
    scores, rows = search_parts(query_emb, parts, args.depth, similarity=encoder.similarity)
    run = run_from_rows(scores, rows, qids, IdColumn(data.corpus))
    row_of = IdIndex(data.corpus)
    pairs = [(i, p) for i, q in enumerate(qids) for p in positives[q]]
    emb = take_rows(parts, [row_of[p] for _, p in pairs])  # every positive in one read
    queries = query_emb
    if encoder.similarity == "cos":
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        queries = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    pos_scores: Dict[str, Dict[str, float]] = {q: {} for q in qids}
    for (i, p), e in zip(pairs, emb):
        pos_scores[qids[i]][p] = float(e @ queries[i])
    return run, pos_scores


def mine(data, args: MineArgs, teacher=None) -> Dict[str, Dict]:
    """{qid: {"pos": [...], "neg": [...]}} for every query with a judged-relevant document."""
    qids_all, texts_all = judged_queries(data)
    relevant = {q: [d for d, r in data.qrels[q].items() if r > 0] for q in qids_all}
    qids = [q for q in qids_all if relevant[q]]
    qtexts = [t for q, t in zip(qids_all, texts_all) if relevant[q]]
    args.stats = {"queries": len(qids), "queries_without_positive": len(qids_all) - len(qids),
                  "dropped_teacher_margin": 0, "dropped_pos_ratio": 0, "dropped_max_score": 0,
                  "dropped_duplicate_text": 0, "dropped_identical_id": 0}
    run, pos_scores = retrieve(data, qids, qtexts, args, {q: relevant[q] for q in qids})
    doc_text = _doc_texts(data)
    out = {}
    for q, text in zip(qids, qtexts):
        positives = set(relevant[q])
        pos_texts = {doc_text(p) for p in positives}
        ranked = [p for p, _ in sorted(run.get(q, {}).items(), key=lambda kv: -kv[1])
                  if p not in positives]
        if q in ranked:  # BEIR's identical ids (ArguAna, Quora): the query's own document
            ranked.remove(q)
            args.stats["dropped_identical_id"] += 1
        kept = []
        for p in ranked:
            if doc_text(p) in pos_texts:
                args.stats["dropped_duplicate_text"] += 1
            else:
                kept.append(p)
        window = kept[args.skip_top: args.skip_top + args.window if args.window else None]
        window = _filter(q, text, window, run[q], pos_scores[q], positives, args, teacher, doc_text)
        rng = np.random.default_rng([args.seed, stable_hash(q)])
        chosen = sorted(rng.choice(len(window), min(args.n, len(window)), replace=False).tolist())
        out[q] = {"pos": sorted(positives), "neg": [window[i] for i in chosen]}
    return out


def mine_together(data, args: MineArgs, teacher=None) -> Dict[str, Dict]:
    """mine() when several processes run (every one must call it): dense mining encodes one slice
    of the corpus and queries per process (encode_sharded); BM25 ranks on the main process only
    and sends the result to the others, so a run holds one BM25 index, not one per process."""
    if args.retriever != "bm25" or not is_distributed():
        return mine(data, args, teacher)
    mined = mine(data, args, teacher) if is_main() else None
    mined, args.stats = broadcast_object((mined, args.stats))
    return mined


def _filter(qid, text, window, scores, pos_scores, positives, args, teacher, doc_text):
    if args.max_score is not None:
        kept = [p for p in window if scores[p] < args.max_score]
        args.stats["dropped_max_score"] += len(window) - len(kept)
        window = kept
    if args.max_pos_ratio is not None and pos_scores:
        ceiling = args.max_pos_ratio * min(pos_scores.values())
        kept = [p for p in window if scores[p] < ceiling]
        args.stats["dropped_pos_ratio"] += len(window) - len(kept)
        window = kept
    if args.teacher_margin is not None and window:
        if teacher is None:
            raise ValueError("--teacher-margin needs --teacher")
        pos = sorted(positives)
        t = teacher.score([text] * (len(pos) + len(window)), [doc_text(p) for p in pos + window])
        bound = t[:len(pos)].min() - args.teacher_margin
        kept = [p for p, s in zip(window, t[len(pos):]) if s < bound]
        args.stats["dropped_teacher_margin"] += len(window) - len(kept)
        window = kept
    return window


def _doc_texts(data):
    """pid -> title + " " + text, read on demand from the corpus table and memoised."""
    store = TextStore.from_table(data.corpus, with_title=True)
    cache: Dict[str, str] = {}

    def text(pid: str) -> str:
        if pid not in cache:
            cache[pid] = store[pid]
        return cache[pid]
    return text


def system_name(args: MineArgs) -> str:
    """The default name of the mined list in the hard-negatives file."""
    if args.retriever == "bm25":
        return "bm25"
    model = Path(args.model).name
    return f"dense:{model}" if args.retriever == "dense" else f"hybrid-{args.fusion}:{model}"


def write_hard_negatives(mined: Dict[str, Dict], system: str, path) -> None:
    def write(f):
        for q, row in mined.items():
            f.write(json.dumps({"qid": q, "pos": row["pos"], "neg": {system: row["neg"]}}) + "\n")
    write_text_atomic(path, write)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--data", required=True, help="BEIR folder or MS MARCO-layout folder (or a "
                   "name under $TWOTOWER_DATA)")
    p.add_argument("--split", default="train", help="qrels split (BEIR)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    defaults = MineArgs()
    for name in ("retriever", "model", "fusion", "dense_weight", "depth", "skip_top", "window",
                 "n", "seed", "system",
                 "teacher", "teacher_kind", "teacher_margin", "max_pos_ratio", "max_score",
                 "teacher_cache", "batch_size"):
        value = getattr(defaults, name)
        kind = float if name in ("teacher_margin", "max_pos_ratio", "max_score") else type(value)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    p.add_argument("--bf16", action="store_true", help="dense: encode under bf16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="dense: encode with torch.compile + weight freezing (README, Performance)")
    p.add_argument("--shards", default="", metavar="DIR",
                   help="dense/hybrid: corpus embeddings as on-disk shards in DIR, searched "
                        "exactly shard by shard (a corpus past RAM; reused while they match)")
    p.add_argument("--shards-dtype", choices=("float16", "float32"), default="float16")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    several = join_processes()
    output = Path(ns.output)
    if output.exists() and not ns.overwrite:
        print(f"error: {output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    fields = {k: v for k, v in vars(ns).items() if k in MineArgs.__dataclass_fields__}
    args = MineArgs(**fields)
    teacher = None
    if args.teacher:
        teacher = Teacher(TeacherArgs(model=args.teacher, kind=args.teacher_kind),
                          cache_path=args.teacher_cache or None, key="--teacher")
    data = load_eval_data(ns.data, ns.split)
    mined = mine_together(data, args, teacher)
    if not is_main():  # every process has the same result; one writes it
        return 0
    system = args.system or system_name(args)
    write_hard_negatives(mined, system, output)
    sizes = [len(r["neg"]) for r in mined.values()]
    print(json.dumps({"output": str(output), "system": system, **args.stats,
                      "processes": world_size() if several else 1,
                      "negatives_per_query_mean": float(np.mean(sizes)) if sizes else 0.0,
                      "queries_with_fewer_than_n": sum(s < args.n for s in sizes)}, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    leave_processes()
    sys.exit(code)
