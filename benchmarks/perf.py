"""Performance benchmarks against sentence-transformers, on the same model, data and settings.

    TWOTOWER_DATA=../shared/data python -m benchmarks.perf [encode] [train] [memory] [scaling]
        [padding] [--docs 512] [--full] [--repeats 3] [--steps 4] [--warmup 1] [--batch-size 32]
        [--dropout configured attention_off none] [--results DIR]

Sections (each bench_<section> says what it measures): 1. encode (benchmarks/perf_encode.py),
docs/s of sentence-transformers, twotower torch, ONNX and OpenVINO, int8 included; 2-3. train
(benchmarks/perf_train.py), fine-tuning pairs/s and model FLOPs/s, and the loop's overhead;
4. memory, peak RSS of a step; 5. scaling, cost as batch and corpus double; 6. padding, padded
tokens of an epoch. Results: perf.json and perf.md in --results (default benchmarks/results;
merged per section, so sections can be run separately). The machine is shared: the load average
is recorded with every section, and ratios (both systems measured in the same run, interleaved)
matter more than absolute times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.perf_encode import SYSTEMS, bench_encode, scifact_corpus
from benchmarks.perf_train import (DROPOUT, MODEL, bench_train, build, load_average, timed,
                                   twotower_run)
from twotower.common.model.encoder import Encoder
from twotower.common.model.grad_cache import GradCache
from twotower.common.recipe.args import ModelArgs
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.data import GroupCollator, GroupDataset
from twotower.finetune.sources import build_pool
from twotower.finetune.tokens import LongestDocument, TokenCache
from twotower.pretrain.args import MethodArgs
from twotower.pretrain.losses import build_method

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("encode", "train", "memory", "scaling", "padding")


def memory_child(chunk: int, batch: int, max_length: int, limit_gb: float) -> dict:
    """One in-batch pretraining step in this process, its address space capped at limit_gb."""
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30),) * 2)
    encoder = Encoder.load(ModelArgs(name_or_path=MODEL, max_doc_length=max_length,
                                     max_query_length=max_length))
    method = build_method(encoder, MethodArgs(name="inbatch"), n_pairs=1, seed=0).train()
    words = [d.split() for d in scifact_corpus()[2][:batch]]  # crops: query half, key half
    q = encoder.tokenize([" ".join(w[: len(w) // 2]) for w in words], tower="query")
    k = encoder.tokenize([" ".join(w[len(w) // 2:]) for w in words], tower="doc")
    batch_dict = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                  "k_input_ids": k["input_ids"], "k_attention_mask": k["attention_mask"]}
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-5)
    before, error = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    start = time.perf_counter()
    try:
        if chunk:
            cache = GradCache(method, chunk)
            cache.forward(batch_dict)
            cache.backward()
        else:
            method(batch_dict)[0].backward()
        optimizer.step()
    except (MemoryError, RuntimeError) as exc:  # the address-space limit was hit
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_gb": round(peak / 2**20, 2), "rss_before_step_gb": round(before / 2**20, 2),
            "step_s": round(time.perf_counter() - start, 1), "error": error,
            "tokens": [list(q["input_ids"].shape), list(k["input_ids"].shape)]}


def bench_memory(ns) -> dict:
    """Peak RSS (ru_maxrss) of one in-batch pretraining step (bundled MiniLM, --memory-batch query
    crops + as many key crops of SciFact documents, max length 128, fp32) with GradCache
    (train.grad_cache_chunk=--memory-chunk) and without, each in a fresh subprocess whose address
    space is capped at 12 GB so that the uncached step cannot push a shared machine into swap or
    the OOM killer: if it needs more, the row says so."""
    out: dict = {"batch": ns.memory_batch, "max_length": 128, "chunk": ns.memory_chunk,
                 "limit_gb": 12, "load_before": load_average(), "rows": []}
    for chunk in (ns.memory_chunk, 0):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--memory-child",
                               str(chunk), str(ns.memory_batch), "128", "12"],
                              capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            "peak_rss_gb": None, "step_s": None,
            "error": f"child exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        row["setting"] = f"GradCache chunk {chunk}" if chunk else "no GradCache"
        if row.get("error"):  # peak RSS is then where the step stopped, not what it needed
            row["setting"] += (" — did not fit: allocation refused at the 12 GB address-space "
                               "limit, peak RSS when it stopped")
        out["rows"].append(row)
        print(row, flush=True)
    out["load_after"] = load_average()
    return out


def bench_scaling(ns) -> dict:
    """Encoding: seconds per document as the corpus doubles; training: seconds per step as the
    batch doubles (twotower fine-tuning step, fp32), plain, then with GradCache (chunk
    --memory-chunk): at 256 tokens a plain batch of 128 was OOM-killed at 24 GB on this machine,
    so the larger batches only run cached. "× previous" is the cost growth (2.0 = linear)."""
    texts = scifact_corpus()[2]
    enc = Encoder.load(ModelArgs(name_or_path=MODEL, max_doc_length=ns.max_length))
    out: dict = {"load_before": load_average(), "encode": [], "train": []}
    enc.encode(texts[:16], tower="doc", progress=False)
    for n in ns.scaling_docs:
        med = statistics.median(timed(lambda: enc.encode(texts[:n], tower="doc", progress=False,
                                                         batch_size=ns.encode_batch_size))[0]
                                for _ in range(ns.scaling_repeats))
        row = {"docs": n, "seconds": round(med, 2), "ms_per_doc": round(1000 * med / n, 1)}
        if out["encode"]:
            row["x_previous"] = round(med / out["encode"][-1]["seconds"], 2)
        out["encode"].append(row)
    warmup = max(ns.warmup, 1)
    for b, chunk in ([(b, 0) for b in ns.scaling_batches]
                     + [(b, ns.memory_chunk) for b in ns.scaling_cached_batches]):
        stamps, _ = twotower_run(build(b, ns.max_length, b * (ns.steps + warmup)), ns.steps,
                                 warmup, "fp32", grad_cache_chunk=chunk)
        med = statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))
        row = {"batch": b, "grad_cache_chunk": chunk, "s_per_step": round(med, 2),
               "ms_per_pair": round(1000 * med / b, 1)}
        same_kind = [r for r in out["train"] if r["grad_cache_chunk"] == chunk]
        if same_kind:
            row["x_previous"] = round(med / same_kind[-1]["s_per_step"], 2)
        out["train"].append(row)
    out["load_after"] = load_average()
    return out


def bench_padding(ns) -> dict:
    """What data.length_grouped saves, in padded document tokens per epoch (the transformer's
    work grows with them), random duplicate-free order vs length-grouped order, on the training
    data of `msmarco_margin_mse_cpu` (the MS MARCO sample, its hard-negatives file) and `fewshot`
    with Margin-MSE (SciFact train, BM25-mined negatives). Counting, not timing: the result does
    not depend on the machine's load. Teacher scores are not computed (the order ignores them)."""
    logging.getLogger("twotower").setLevel(logging.WARNING)
    margin = ["loss.infonce.weight=0", "loss.margin_mse.weight=1", "data.length_grouped=true",
              "data.teacher_scores=unused"]
    out: dict = {"rows": []}
    for name, recipe_name, overrides in (
            ("msmarco_margin_mse_cpu (MS MARCO sample)", "msmarco_margin_mse_cpu", []),
            ("fewshot + Margin-MSE (SciFact train)", "fewshot", margin)):
        recipe = load_recipe(FinetuneRecipe, recipe_name, overrides)
        (_, stage), = recipe.stage_list()
        data = dataclasses.replace(stage.data, teacher_scores="", teacher_margin=None)
        pool = build_pool(data)
        encoder = Encoder.load(dataclasses.replace(recipe.model, random_init=False,
                                                   name_or_path=MODEL))
        tokens = TokenCache(encoder, pool)
        tokens.pretokenize()
        size, collate = recipe.train.per_device_batch_size, GroupCollator(encoder.tokenize, tokens)
        common = dict(n_negatives=data.n_negatives, seed=recipe.train.seed, global_batch_size=size)
        row = {"data": name, "groups": len(pool.groups), "batch": size,
               "negatives": data.n_negatives, "max_doc_length": recipe.model.max_doc_length}
        for label, dataset in (("random", GroupDataset(pool, **common)), ("length_grouped",
                               GroupDataset(pool, **common, length_of=LongestDocument(tokens)))):
            dataset.set_epoch(0)
            order = dataset.epoch_order(0, recipe.train.seed)
            masks = [collate([dataset[i] for i in order[s:s + size]])["doc_attention_mask"]
                     for s in range(0, len(order), size)]
            row[f"{label}_padded"] = sum(m.numel() for m in masks)
            row[f"{label}_real"] = sum(int(m.sum()) for m in masks)
        # per real token: the two orders may leave out different groups of an epoch
        row["padded_ratio"] = round((row["length_grouped_padded"] / row["length_grouped_real"])
                                    / (row["random_padded"] / row["random_real"]), 3)
        out["rows"].append(row)
        print(row, flush=True)
    return out


# ----------------------------------------------------------------------------- output
def write_results(section: str, result: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "perf.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    previous = everything.get(section, {})
    if section == "encode" and "full_corpus" not in result and "full_corpus" in previous:
        # a speed-only rerun keeps the earlier full-corpus quality check, marked as such
        result["full_corpus"] = {**previous["full_corpus"],
                                 "from_earlier_run": previous.get("when", "?")}
    everything[section] = {**result, "command": "python -m benchmarks.perf " + " ".join(sys.argv[1:]),
                           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores (shared)"}
    path.write_text(json.dumps(everything, indent=2))
    (results / "perf.md").write_text(markdown(everything))
    print(json.dumps({section: result}, indent=2))


def table(header: list[str], rows) -> list[str]:
    """A markdown table; a cell that a row lacks (None) shows as '-'."""
    def line(cells):
        return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def markdown(res: dict) -> str:
    lines = ["# twotower performance vs sentence-transformers", "",
             "Written by `benchmarks/perf.py` on a shared 2-core CPU (load average = 1/5/15-minute, "
             "before and after). Encoding and training: medians of interleaved repeats (every "
             "system once per round), so a burst of load hits all systems alike.", ""]
    load = "load {load_before} -> {load_after}"
    if "encode" in res:
        e = res["encode"]
        lines += [("## 1. Encoding SciFact documents ({docs} docs, batch {batch_size}, max length "
                   "{max_length}; " + load + ")").format(**e), ""]
        lines += table(["system", "docs/s", "× sentence-transformers", "max abs diff vs ST",
                        "warm-up s (compiles)"],
                       [[name, s["docs_per_s"], s["speedup_vs_st"], s.get("max_abs_diff_vs_st"),
                         s.get("warmup_s")] for name, s in e["systems"].items()])
        if "full_corpus" in e:
            f = e["full_corpus"]
            lines += ["", f"Full corpus ({f['docs']} docs, {f['queries']} test queries):", ""]
            lines += table(["system", "nDCG@10", "Δ vs ST", "docs/s"],
                           [[name, s["nDCG@10"], s["delta_vs_st"] and f"{s['delta_vs_st']:+.4f}",
                             s["docs_per_s"]]
                            for name, s in f["systems"].items()])
        lines.append("")
    if "train" in res:
        t = res["train"]
        lines += [("## 2-3. Fine-tuning MNRL + 1 hard negative (batch {batch_size}, max length "
                   "{max_length}, {steps} timed steps after {warmup}; " + load + ")").format(**t),
                  ""]
        if "matmul_peak_gflops" in t:
            lines += ["Model GFLOP/s: 3 × forward FLOPs, forward = 2 N L + 2 n_layer L² d_model "
                      "per sequence of padded length L (Kaplan et al. 2020); matmul peak (torch.mm, "
                      "4096², median of 3): " + ", ".join(
                          f"{p} {g} GFLOP/s" for p, g in t["matmul_peak_gflops"].items()), ""]
        keys = ("system", "precision", "dropout", "pairs_per_s", "model_gflops_per_s",
                "of_matmul_peak", "vs_st_same_precision", "vs_st_fp32")
        lines += table(["system", "precision", "dropout", "pairs/s", "model GFLOP/s",
                        "of matmul peak", "× ST trainer (same precision)", "× ST fp32"],
                       [[row.get(k) for k in keys] for row in t["rows"]])
        lines += [f"\nOverhead {key}: twotower step / bare loop step = {ratio}"
                  for key, ratio in t.get("overhead", {}).items()] + [""]
    if "memory" in res:
        m = res["memory"]
        lines += [("## 4. Peak RSS of one in-batch step (batch {batch}, max length {max_length}; "
                   + load + ")").format(**m), ""]
        lines += table(["setting", "peak RSS (GB)", "step s"],
                       [[r["setting"], r["peak_rss_gb"], r["step_s"]] for r in m["rows"]]) + [""]
    if "scaling" in res:
        s = res["scaling"]
        lines += [("## 5. Scaling (" + load + ")").format(**s), ""]
        lines += table(["corpus docs", "encode s", "ms/doc", "× previous row"],
                       [[r["docs"], r["seconds"], r["ms_per_doc"], r.get("x_previous")]
                        for r in s["encode"]]) + [""]
        lines += table(["batch", "GradCache chunk", "s/step", "ms/pair", "× previous (same kind)"],
                       [[r["batch"], r.get("grad_cache_chunk") or "off", r["s_per_step"],
                         r["ms_per_pair"], r.get("x_previous")] for r in s["train"]]) + [""]
    if "padding" in res:
        lines += ["## 6. data.length_grouped: padded document tokens of one epoch (counted)", ""]
        lines += table(["training data", "groups", "batch", "random: padded / real",
                        "length-grouped: padded / real", "padded per real token, grouped ÷ random"],
                       [[r["data"], r["groups"], r["batch"],
                         f"{r['random_padded']} / {r['random_real']}",
                         f"{r['length_grouped_padded']} / {r['length_grouped_real']}",
                         r["padded_ratio"]] for r in res["padding"]["rows"]]) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder of perf.json and perf.md (merged into)")
    p.add_argument("--docs", type=int, default=512, help="documents for the encoding speed ratio")
    p.add_argument("--encode-systems", nargs="+", choices=SYSTEMS, metavar="SYSTEM",
                   help=f"encode: these only (and {SYSTEMS[0]!r}); default all of {SYSTEMS}")
    p.add_argument("--full", nargs="*", choices=SYSTEMS, metavar="SYSTEM",
                   help="encode: also nDCG@10 on the full SciFact test, for these (default all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--encode-batch-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="training batch (pairs)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--train-repeats", type=int, default=3,
                   help="interleaved runs of every training system (median reported)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--dropout", nargs="+", default=list(DROPOUT), choices=list(DROPOUT),
                   help="train: dropout of the bare loop and twotower (the first also runs ST)")
    p.add_argument("--compile", action="store_true",
                   help="train: also the bare loop with forward + loss under torch.compile, and "
                        "twotower with train.compile")
    p.add_argument("--memory-batch", type=int, default=512)
    p.add_argument("--memory-chunk", type=int, default=32)
    p.add_argument("--scaling-repeats", type=int, default=1)
    p.add_argument("--scaling-docs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--scaling-batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--scaling-cached-batches", type=int, nargs="+", default=[64, 128],
                   help="batches timed with GradCache (chunk --memory-chunk)")
    ns = p.parse_args(argv)
    if not os.environ.get("TWOTOWER_DATA"):
        p.error("set TWOTOWER_DATA to the offline data folder (the one holding scifact/)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench = {"encode": bench_encode, "train": bench_train, "memory": bench_memory,
             "scaling": bench_scaling, "padding": bench_padding}
    for section in ns.sections:
        write_results(section, bench[section](ns), ns.results)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:  # one measurement of bench_memory, in its own process
        print(json.dumps(memory_child(*map(int, sys.argv[2:5]), float(sys.argv[5]))))
    else:
        sys.exit(main())
