"""Performance benchmarks against sentence-transformers, on the same model, data and settings.

    TWOTOWER_DATA=../shared/data python -m benchmarks.perf [encode] [train] [memory] [scaling]
        [padding] [--docs 512] [--full] [--repeats 3] [--steps 4] [--warmup 1] [--batch-size 32]

1. encode: SciFact corpus docs/s, twotower `Encoder.encode` (fp32 and bf16 autocast, each also
   under torch.compile with weight freezing; the compilation is timed apart as warm-up) vs
   `SentenceTransformer.encode`, bundled all-MiniLM-L6-v2, max length 256, equal batch size. The
   speed ratio is measured on the first --docs documents (median of --repeats); with --full the
   whole corpus (5,183 docs) is encoded once per system and nDCG@10 on SciFact test is compared.
2. train (benchmarks/perf_train.py): pairs/s of fine-tuning MNRL with one hard negative,
   twotower's Trainer vs sentence-transformers' trainer, fp32 and bf16; and (3) the overhead of
   twotower's step over a bare loop (forward, the same loss, backward, AdamW).
4. memory (benchmarks/perf_memory.py): peak RSS of an in-batch step at batch 512, max length 128,
   with and without GradCache (train.grad_cache_chunk), each in a fresh subprocess.
5. scaling: time per step as the batch doubles, time per document as the corpus doubles.
6. padding (benchmarks/perf_padding.py): padded document tokens of an epoch, random vs
   length-grouped batches (data.length_grouped), counted.

Results: benchmarks/results/perf.json and perf.md (merged per section, so sections can be run
separately). The machine is shared: the load average is recorded with every section, and ratios
(both systems measured in the same run, interleaved) matter more than absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.perf_common import (MODEL, corpus_texts, load_average, median_time, ndcg_of,
                                    scifact_test, st_model)
from benchmarks.perf_memory import bench_memory
from benchmarks.perf_padding import bench_padding
from benchmarks.perf_train import bench_train, twotower_step_times
from twotower.common.eval.evaluate import judged_queries
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.args import ModelArgs

RESULTS = Path(__file__).parent / "results"


def bench_encode(ns) -> dict:
    data = scifact_test()
    doc_ids, texts = corpus_texts(data)
    sample = texts[: ns.docs]
    enc = Encoder.load(ModelArgs(name_or_path=MODEL, max_doc_length=ns.max_length))
    st = st_model(ns.max_length)
    bs = ns.encode_batch_size
    systems = {
        "sentence-transformers fp32": lambda t: st.encode(t, batch_size=bs, convert_to_numpy=True,
                                                          show_progress_bar=False),
        "twotower fp32": lambda t: enc.encode(t, tower="doc", batch_size=bs, progress=False),
        "twotower bf16": lambda t: enc.encode(t, tower="doc", batch_size=bs, progress=False,
                                              bf16=True),
        # torch.compile + weight freezing (eval.compile / --compile); compiled in the warm-up
        "twotower fp32 compiled": lambda t: enc.encode(t, tower="doc", batch_size=bs,
                                                       progress=False, compile=True),
        "twotower bf16 compiled": lambda t: enc.encode(t, tower="doc", batch_size=bs,
                                                       progress=False, bf16=True, compile=True),
    }
    out: dict = {"docs": len(sample), "batch_size": bs, "max_length": ns.max_length,
                 "threads": torch.get_num_threads(), "load_before": load_average(), "systems": {}}
    warmup_s = {}
    for name, fn in systems.items():  # one warm-up pass on a few docs each (compiles), timed apart
        t = time.perf_counter()
        fn(sample[:bs])
        warmup_s[name] = round(time.perf_counter() - t, 1)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(ns.repeats):  # interleaved, so a burst of load hits every system alike
        for name, fn in systems.items():
            t = time.perf_counter()
            fn(sample)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["sentence-transformers fp32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        out["systems"][name] = {"median_s": round(med, 3), "times_s": [round(t, 3) for t in ts],
                                "docs_per_s": round(len(sample) / med, 2),
                                "speedup_vs_st": round(base / med, 3),
                                "warmup_s": warmup_s[name]}
    # same embeddings? (max abs difference on the sample, fp32 and bf16 vs sentence-transformers)
    ref = systems["sentence-transformers fp32"](sample[:64])
    for name in [n for n in systems if n.startswith("twotower")]:
        diff = float(abs(systems[name](sample[:64]) - ref).max())
        out["systems"][name]["max_abs_diff_vs_st"] = round(diff, 6)
    if ns.full:
        qids, qtexts = judged_queries(data)
        full: dict = {}
        for name, fn in systems.items():
            t = time.perf_counter()
            doc_emb = fn(texts)
            seconds = time.perf_counter() - t
            if name.startswith("sentence"):
                query_emb = st.encode(qtexts, batch_size=bs, show_progress_bar=False)
            else:
                query_emb = enc.encode(qtexts, tower="query", batch_size=bs, progress=False,
                                       bf16="bf16" in name, compile=name.endswith("compiled"))
            full[name] = {"nDCG@10": round(ndcg_of(data, doc_emb, query_emb, doc_ids), 4),
                          "corpus_s": round(seconds, 1),
                          "docs_per_s": round(len(texts) / seconds, 2)}
        st_ndcg = full["sentence-transformers fp32"]["nDCG@10"]
        for name in full:
            full[name]["delta_vs_st"] = round(full[name]["nDCG@10"] - st_ndcg, 4)
        out["full_corpus"] = {"docs": len(texts), "queries": len(qids), "systems": full}
    out["load_after"] = load_average()
    return out


def bench_scaling(ns) -> dict:
    """Encoding: seconds per document as the corpus doubles; training: seconds per step as the
    batch doubles (twotower fine-tuning step, fp32)."""
    data = scifact_test()
    _, texts = corpus_texts(data)
    enc = Encoder.load(ModelArgs(name_or_path=MODEL, max_doc_length=ns.max_length))
    out: dict = {"load_before": load_average(), "encode": [], "train": []}
    enc.encode(texts[:16], tower="doc", progress=False)
    for n in ns.scaling_docs:
        med, _ = median_time(lambda n=n: enc.encode(texts[:n], tower="doc", progress=False,
                                                    batch_size=ns.encode_batch_size),
                            ns.scaling_repeats)
        out["encode"].append({"docs": n, "seconds": round(med, 2), "ms_per_doc": round(1000 * med / n, 1)})
        if len(out["encode"]) > 1:  # cost growth when the corpus doubles (2.0 = linear)
            prev = out["encode"][-2]
            out["encode"][-1]["x_previous"] = round(med / prev["seconds"], 2)
    # plain steps, then GradCache steps (chunk --memory-chunk): at 256 tokens a plain batch of 128
    # was OOM-killed at 24 GB on this machine, so the larger batches only run cached
    runs = [(b, 0) for b in ns.scaling_batches] + [(b, ns.memory_chunk)
                                                   for b in ns.scaling_cached_batches]
    for b, chunk in runs:
        times = twotower_step_times(b, ns.max_length, steps=ns.steps, warmup=ns.warmup,
                                    grad_cache_chunk=chunk)
        med = statistics.median(times)
        row = {"batch": b, "grad_cache_chunk": chunk, "s_per_step": round(med, 2),
               "ms_per_pair": round(1000 * med / b, 1)}
        same_kind = [r for r in out["train"] if r["grad_cache_chunk"] == chunk]
        if same_kind:  # cost growth when the batch doubles (2.0 = linear)
            row["x_previous"] = round(med / same_kind[-1]["s_per_step"], 2)
        out["train"].append(row)
    out["load_after"] = load_average()
    return out


# ----------------------------------------------------------------------------- output
def write_results(section: str, result: dict, ns) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "perf.json"
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
    (RESULTS / "perf.md").write_text(markdown(everything))
    print(json.dumps({section: result}, indent=2))


def markdown(res: dict) -> str:
    lines = ["# twotower performance vs sentence-transformers", "",
             "Written by `benchmarks/perf.py` on a shared 2-core CPU (load average = 1/5/15-minute, "
             "before and after). Encoding and training: medians of interleaved repeats (every "
             "system once per round), so a burst of load hits all systems alike.", ""]
    if "encode" in res:
        e = res["encode"]
        lines += [f"## 1. Encoding SciFact documents ({e['docs']} docs, batch {e['batch_size']}, "
                  f"max length {e['max_length']}; load {e['load_before']} -> {e['load_after']})", "",
                  "| system | docs/s | × sentence-transformers | max abs diff vs ST | "
                  "warm-up s (compiles) |", "|---|---|---|---|---|"]
        for name, s in e["systems"].items():
            lines.append(f"| {name} | {s['docs_per_s']} | {s['speedup_vs_st']} | "
                         f"{s.get('max_abs_diff_vs_st', '-')} | {s.get('warmup_s', '-')} |")
        if "full_corpus" in e:
            f = e["full_corpus"]
            lines += ["", f"Full corpus ({f['docs']} docs, {f['queries']} test queries):", "",
                      "| system | nDCG@10 | Δ vs ST | docs/s |", "|---|---|---|---|"]
            for name, s in f["systems"].items():
                lines.append(f"| {name} | {s['nDCG@10']} | {s['delta_vs_st']:+.4f} | {s['docs_per_s']} |")
        lines.append("")
    if "train" in res:
        t = res["train"]
        lines += [f"## 2-3. Fine-tuning MNRL + 1 hard negative (batch {t['batch_size']}, max length "
                  f"{t['max_length']}, {t['steps']} timed steps after {t['warmup']}; load "
                  f"{t['load_before']} -> {t['load_after']})", "",
                  "| system | precision | pairs/s | × ST trainer (same precision) | × ST fp32 |",
                  "|---|---|---|---|---|"]
        for row in t["rows"]:
            lines.append(f"| {row['system']} | {row['precision']} | {row['pairs_per_s']} | "
                         f"{row.get('vs_st_same_precision', '-')} | {row.get('vs_st_fp32', '-')} |")
        for prec, ratio in t.get("overhead", {}).items():
            lines.append(f"\nOverhead {prec}: twotower step / bare loop step = {ratio}")
        lines.append("")
    if "memory" in res:
        m = res["memory"]
        lines += [f"## 4. Peak RSS of one in-batch step (batch {m['batch']}, max length "
                  f"{m['max_length']}; load {m['load_before']} -> {m['load_after']})", "",
                  "| setting | peak RSS (GB) | step s |", "|---|---|---|"]
        for row in m["rows"]:
            lines.append(f"| {row['setting']} | {row['peak_rss_gb']} | {row['step_s']} |")
        lines.append("")
    if "scaling" in res:
        s = res["scaling"]
        lines += [f"## 5. Scaling (load {s['load_before']} -> {s['load_after']})", "",
                  "| corpus docs | encode s | ms/doc | × previous row |", "|---|---|---|---|"]
        lines += [f"| {r['docs']} | {r['seconds']} | {r['ms_per_doc']} | {r.get('x_previous', '-')} |"
                  for r in s["encode"]]
        lines += ["", "| batch | GradCache chunk | s/step | ms/pair | × previous (same kind) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r.get('grad_cache_chunk') or 'off'} | {r['s_per_step']} | "
                  f"{r['ms_per_pair']} | {r.get('x_previous', '-')} |" for r in s["train"]]
        lines.append("")
    if "padding" in res:
        lines += ["## 6. data.length_grouped: padded document tokens of one epoch (counted)", "",
                  "| training data | groups | batch | random: padded / real | length-grouped: "
                  "padded / real | padded per real token, grouped ÷ random |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['data']} | {r['groups']} | {r['batch']} | {r['random_padded']} / "
                  f"{r['random_real']} | {r['length_grouped_padded']} / {r['length_grouped_real']} "
                  f"| {r['padded_ratio']} |" for r in res["padding"]["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("sections", nargs="*", default=["encode", "train", "memory", "scaling", "padding"],
                   choices=["encode", "train", "memory", "scaling", "padding"])
    p.add_argument("--docs", type=int, default=512, help="documents for the encoding speed ratio")
    p.add_argument("--full", action="store_true", help="also nDCG@10 on the full SciFact test")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--encode-batch-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="training batch (pairs)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--train-repeats", type=int, default=3,
                   help="interleaved runs of every training system (median reported)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
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
    for section in ns.sections:
        if section == "encode":
            write_results("encode", bench_encode(ns), ns)
        elif section == "train":
            write_results("train", bench_train(ns), ns)
        elif section == "memory":
            write_results("memory", bench_memory(ns), ns)
        elif section == "scaling":
            write_results("scaling", bench_scaling(ns), ns)
        elif section == "padding":
            write_results("padding", bench_padding(ns), ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
