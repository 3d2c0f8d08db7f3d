"""Evaluate a dense model or BM25 on a BEIR-style or MS MARCO folder (common/eval/evaluate.py).

    python -m twotower.common.eval.evaluate --model bundled:all-MiniLM-L6-v2 --data scifact --split test
    python -m twotower.common.eval.evaluate --system bm25 --data scifact
    python -m twotower.common.eval.evaluate --model M --data msmarco_sample --split dev --rerank bm25_top20.trec
    accelerate launch --multi_gpu --num_processes 2 -m twotower.common.eval.evaluate --model M --data scifact
        (the corpus is encoded in 2 shards; one process writes the outputs)
    python -m twotower.common.eval.evaluate --model M --data msmarco --split dev --shards DIR
        (a corpus past RAM: embeddings on disk, exact search streamed, common/eval/corpus_shards.py)
    python -m twotower.common.eval.evaluate --model M --qa-passages psgs_w100.tsv --qa-questions nq-test.qa.csv
        (open-domain QA top-k answer accuracy as in DPR, common/eval/qa.py; also --system bm25)
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

from twotower.common.data import DataError, load_run, resolve_data
from twotower.common.eval.bm25 import BM25Args
from twotower.common.eval.evaluate import (evaluate_bm25, evaluate_dense, evaluate_hybrid,
                                           evaluate_rerank, load_eval_data, subsample)
from twotower.common.eval.fusion import METHODS
from twotower.common.eval.metrics import resolve_measures
from twotower.common.eval.outputs import existing_outputs, write_outputs
from twotower.common.eval.qa import run_cli
from twotower.common.eval.sharded import join_processes, process_device
from twotower.common.model.distributed import is_main
from twotower.common.model.encoder import Encoder  # torch: only when needed
from twotower.common.recipe.args import ModelArgs


def slug(text: str) -> str:
    text = text.split(":", 1)[1] if text.startswith("bundled:") else text
    text = Path(text).name if Path(text).exists() else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower.common.eval.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a mistyped flag must not match a prefix
    p.add_argument("--system", choices=("dense", "bm25", "hybrid"), default="dense",
                   help="hybrid: BM25 and dense fused (--fusion)")
    p.add_argument("--model", help="hub id, local folder or bundled:all-MiniLM-L6-v2 (dense)")
    p.add_argument("--data", help="data name under $TWOTOWER_DATA or a folder (or the --qa-* "
                   "flags instead)")
    p.add_argument("--split", help="default test")
    p.add_argument("--rerank", metavar="RUNFILE", help="TREC run whose candidates are scored")
    p.add_argument("--k", type=int, help="retrieval depth (default 1000; not with --rerank)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--index", help="dense retrieval: flat (exact, default) | hnsw | ivf | a faiss "
                   "index_factory string such as IVF4096,PQ64")
    p.add_argument("--search-params", help="faiss parameters, e.g. efSearch=512 or nprobe=64")
    p.add_argument("--shards", metavar="DIR", help="dense or hybrid retrieval of a corpus too "
                   "large for RAM: its embeddings encoded a block at a time into on-disk shards "
                   "in DIR, searched exactly shard by shard, or with --index through an index "
                   "built from them a block at a time (IVF...,PQ... for bounded memory); reused "
                   "while model, corpus and settings match; an error if DIR holds others)")
    p.add_argument("--shards-dtype", choices=("float16", "float32"),
                   help="of --shards (default float16: half the disk; its nDCG effect is in "
                        "docs/results.md)")
    p.add_argument("--metrics", nargs="+",
                   help="default: nDCG@10 MRR@10 MAP@100 R@10 R@100 R@1000 (any ir_measures name)")
    p.add_argument("--max-queries", type=int, default=0, help="sample this many judged queries")
    p.add_argument("--max-docs", type=int, default=0,
                   help="corpus = judged documents + this many sampled others")
    p.add_argument("--seed", type=int, default=0, help="for --max-queries/--max-docs sampling")
    p.add_argument("--ignore-identical-ids", action=argparse.BooleanOptionalAction, default=True,
                   help="BEIR's protocol: a retrieved document with the query's own id is not "
                        "scored (default; --no-ignore-identical-ids scores it)")
    p.add_argument("--output-dir", help="default runs/eval/<model>-<data>-<split>")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true")
    enc = p.add_argument_group("encoder settings (default: what the model folder says)")
    enc.add_argument("--pooling", choices=("auto", "mean", "cls"))
    enc.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    enc.add_argument("--max-length", type=int, help="sets both query and document max tokens")
    enc.add_argument("--max-query-length", type=int)
    enc.add_argument("--max-doc-length", type=int)
    enc.add_argument("--query-prefix")
    enc.add_argument("--doc-prefix")
    enc.add_argument("--bf16", action="store_true",
                     help="encode under bf16 autocast (CPUs with AVX512_BF16, GPUs)")
    enc.add_argument("--compile", action="store_true",
                     help="encode with torch.compile + weight freezing (~1.9x fp32 on a 2-core "
                          "CPU, after 20-60 s of compilation)")
    enc.add_argument("--onnx", metavar="FILE",
                     help="encode with this file of the model's onnx/ or openvino/ folder "
                     "(twotower export): model.onnx or model_qint8_*.onnx in onnxruntime, "
                     "openvino_model*.xml in OpenVINO (fp32; with --bf16 at bf16)")
    qa = p.add_argument_group("open-domain QA, top-k answer accuracy (instead of --data)")
    qa.add_argument("--qa-passages", help="DPR passages TSV (id, text, title header; .tsv[.gz])")
    qa.add_argument("--qa-questions", help="DPR qa.csv (question<TAB>[answers]) or jsonl "
                    "{question, answers[, id]}")
    qa.add_argument("--qa-k", type=int, nargs="+", help="accuracy cut-offs (default 5 20 100)")
    qa.add_argument("--qa-match", choices=("string", "regex"),
                    help="DPR answer matching (default string; regex for CuratedTREC)")
    hy = p.add_argument_group("hybrid (--system hybrid: BM25 + dense, common/eval/fusion.py)")
    hy.add_argument("--fusion", choices=METHODS, help="rrf (default) or wsum: min-max "
                    "normalised scores, (1 - w) BM25 + w dense")
    hy.add_argument("--dense-weight", type=float, help="w of --fusion wsum (default 0.5; choose "
                    "it on a dev split, benchmarks/hybrid.py)")
    hy.add_argument("--rrf-k", type=int, help="k of --fusion rrf (default 60)")
    bm = p.add_argument_group("BM25 (--system bm25 or hybrid)")
    bm.add_argument("--bm25-k1", type=float, help=f"default {BM25Args.k1}")
    bm.add_argument("--bm25-b", type=float, help=f"default {BM25Args.b}")
    return p


def _model_args(ns):
    given = {"pooling": ns.pooling, "normalize": ns.normalize, "query_prefix": ns.query_prefix,
             "doc_prefix": ns.doc_prefix, "max_query_length": ns.max_query_length or ns.max_length,
             "max_doc_length": ns.max_doc_length or ns.max_length}
    return ModelArgs(name_or_path=ns.model, **{k: v for k, v in given.items() if v is not None})


def _check_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Flags that do not apply to the chosen system/mode are errors, not silently ignored."""
    def given(*names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(ns, n) is not None]

    encoder_flags = given("pooling", "normalize", "max_length", "max_query_length",
                          "max_doc_length", "query_prefix", "doc_prefix")
    if ns.system in ("dense", "hybrid"):
        if not ns.model:
            parser.error(f"--model is required for --system {ns.system}")
        if ns.system == "dense" and given("bm25_k1", "bm25_b"):
            parser.error(f"{', '.join(given('bm25_k1', 'bm25_b'))} need --system bm25 or hybrid")
    elif ns.model or encoder_flags:
        parser.error(f"--system bm25 takes no {', '.join(given('model') + encoder_flags)}")
    if ns.onnx and (ns.compile or ns.system == "bm25"):
        parser.error("--onnx encodes outside torch: not with --compile or --system bm25")
    if ns.onnx and ns.bf16 and not ns.onnx.endswith(".xml"):
        parser.error("--bf16 with --onnx needs an OpenVINO file (openvino_model*.xml): an ONNX "
                     "file runs in onnxruntime at the precision it was exported with")
    if (ns.system != "dense" or ns.rerank) and given("index", "search_params"):
        parser.error("--index/--search-params are for dense retrieval (not bm25, hybrid or "
                     "--rerank)")
    if given("shards", "shards_dtype") and (ns.system == "bm25" or ns.rerank or ns.qa_passages):
        parser.error("--shards is for dense or hybrid retrieval from the corpus: not with "
                     "--system bm25, --rerank or --qa-*")
    if ns.shards_dtype and not ns.shards:
        parser.error("--shards-dtype needs --shards")
    fusion_flags = given("fusion", "dense_weight", "rrf_k")
    if fusion_flags and ns.system != "hybrid":
        parser.error(f"{', '.join(fusion_flags)} need --system hybrid")
    if ns.system == "hybrid" and (ns.rerank or ns.qa_passages):
        parser.error("--system hybrid retrieves from the corpus: not with --rerank or --qa-*")
    if (ns.dense_weight is not None and ns.fusion != "wsum"
            or ns.rrf_k is not None and ns.fusion == "wsum"):
        parser.error("--dense-weight goes with --fusion wsum, --rrf-k with rrf")
    if ns.dense_weight is not None and not 0.0 <= ns.dense_weight <= 1.0:
        parser.error("--dense-weight must be in [0, 1]")
    if ns.rerank and (ns.max_docs or ns.k is not None):
        parser.error("--max-docs and --k do not apply to --rerank (the candidates are scored)")
    if ns.k is not None and ns.k <= 0 or ns.max_queries < 0 or ns.max_docs < 0:
        parser.error("--k must be > 0; --max-queries and --max-docs >= 0")
    _check_qa_flags(parser, ns, given)
    try:
        resolve_measures(ns.metrics)
    except ValueError as err:
        parser.error(str(err))


def _check_qa_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace, given) -> None:
    """Either --data (BEIR / MS MARCO) or the two --qa input flags, never a mix."""
    qa_inputs = given("qa_passages", "qa_questions")
    if not qa_inputs:
        if ns.data is None:
            parser.error("--data is required (or --qa-passages with --qa-questions)")
        if given("qa_k", "qa_match"):
            parser.error(f"{', '.join(given('qa_k', 'qa_match'))} need --qa-passages and "
                         "--qa-questions")
        return
    if len(qa_inputs) == 1:
        parser.error("--qa-passages and --qa-questions go together")
    not_for_qa = given("data", "split", "rerank", "k", "metrics") + [
        f"--{n.replace('_', '-')}" for n in ("max_queries", "max_docs") if getattr(ns, n)]
    if not_for_qa:
        parser.error(f"{', '.join(not_for_qa)} do not apply to the QA evaluation (--qa-*; "
                     "the retrieval depth is the largest --qa-k)")
    if ns.qa_k is not None and min(ns.qa_k) <= 0:
        parser.error("--qa-k values must be > 0")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _check_flags(parser, ns)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)

    several = join_processes()
    command = "python -m twotower.common.eval.evaluate " + shlex.join(sys.argv[1:] if argv is None
                                                        else list(argv))
    if ns.qa_passages:
        return run_cli(parser, ns, "bm25" if ns.system == "bm25" else slug(ns.model),
                       None if ns.system == "bm25" else _model_args(ns), command, several)
    ns.split = ns.split or "test"
    try:
        data_path = resolve_data(ns.data)
    except DataError as err:
        parser.error(str(err))
    model_slug = {"bm25": "bm25", "hybrid": f"hybrid-{slug(ns.model or '')}"}.get(
        ns.system, slug(ns.model or ""))
    default_dir = Path("runs", "eval", f"{model_slug}-{data_path.name}-{ns.split}"
                       + ("-rerank" if ns.rerank else ""))
    output_dir = Path(ns.output_dir) if ns.output_dir else default_dir
    found = existing_outputs(output_dir)
    if found and not ns.overwrite:  # refuse before any expensive work
        parser.error(f"{output_dir} already has {', '.join(found)}; pass --overwrite to replace "
                     "them, or choose another --output-dir")
    try:
        data = subsample(load_eval_data(data_path, ns.split), ns.max_queries, ns.max_docs, ns.seed)
        candidates = load_run(ns.rerank) if ns.rerank else None
    except DataError as err:  # names file and line; a traceback adds nothing
        parser.exit(1, f"error: {err}\n")
    depth = ns.k or 1000
    bm25_args = BM25Args(**{f: v for f, v in (("k1", ns.bm25_k1), ("b", ns.bm25_b))
                            if v is not None})
    if ns.system == "bm25":
        result = evaluate_bm25(data, k=depth, candidates=candidates, measures=ns.metrics,
                               args=bm25_args, ignore_identical_ids=ns.ignore_identical_ids,
                               progress=not ns.no_progress)
    else:
        try:
            encoder = Encoder.load(_model_args(ns), onnx=ns.onnx, serving_precision=(
                "bf16" if ns.onnx and ns.bf16 else "f32")).to(process_device())
        except FileNotFoundError as err:  # --onnx names a file the model folder lacks
            parser.error(str(err))
        encoder.encode_bf16 = ns.bf16 and not ns.onnx  # OpenVINO's bf16 is its own precision
        encoder.encode_compile = ns.compile
        shards = ({"shards": ns.shards, "shards_dtype": ns.shards_dtype or "float16"}
                  if ns.shards else {})
        if ns.system == "hybrid":
            result = evaluate_hybrid(encoder, data, k=depth, fusion=ns.fusion or "rrf",
                                     dense_weight=0.5 if ns.dense_weight is None
                                     else ns.dense_weight, rrf_k=ns.rrf_k or 60,
                                     batch_size=ns.batch_size, bm25_args=bm25_args,
                                     measures=ns.metrics, progress=not ns.no_progress,
                                     shard=several, ignore_identical_ids=ns.ignore_identical_ids,
                                     **shards)
        elif candidates is not None:
            result = evaluate_rerank(encoder, data, candidates, batch_size=ns.batch_size,
                                     measures=ns.metrics, progress=not ns.no_progress,
                                     ignore_identical_ids=ns.ignore_identical_ids)
        else:
            result = evaluate_dense(encoder, data, k=depth, batch_size=ns.batch_size,
                                    index=ns.index or "flat", search_params=ns.search_params,
                                    measures=ns.metrics, progress=not ns.no_progress,
                                    shard=several, ignore_identical_ids=ns.ignore_identical_ids,
                                    **shards)

    if not is_main():  # every process has the result; one writes it
        return 0
    extra = {"data_path": str(data_path), "candidates": ns.rerank,
             "max_queries": ns.max_queries or None, "max_docs": ns.max_docs or None,
             "command": command}
    paths = write_outputs(result, output_dir, overwrite=ns.overwrite, data=data,
                          extra={k: v for k, v in extra.items() if v is not None})
    width = max(len(n) for n in result.metrics)
    for name, value in result.metrics.items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


