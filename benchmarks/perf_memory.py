"""Benchmark 4 of benchmarks/perf.py: peak RSS of one in-batch pretraining step (bundled MiniLM,
global batch 512 query crops + 512 key crops of SciFact documents, max length 128, fp32),
with GradCache (train.grad_cache_chunk) and without, each in a fresh subprocess (ru_maxrss).

The child limits its address space (--limit-gb, default 12) so that the uncached step cannot
push a shared machine into swap or the OOM killer: if it needs more, the row says so.

    python -m benchmarks.perf_memory --child CHUNK BATCH MAX_LENGTH LIMIT_GB   (one measurement)
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(chunk: int, batch: int, max_length: int, limit_gb: float) -> dict:
    limit = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from benchmarks.perf_common import MODEL, corpus_texts, scifact_test
    from twotower.common.model.grad_cache import GradCache
    from twotower.common.recipe.args import ModelArgs
    from twotower.pretrain.args import MethodArgs
    from twotower.pretrain.losses import build_method

    _, texts = corpus_texts(scifact_test())
    from twotower.common.model.encoder import Encoder

    encoder = Encoder.load(ModelArgs(name_or_path=MODEL, max_doc_length=max_length,
                                     max_query_length=max_length))
    method = build_method(encoder, MethodArgs(name="inbatch"), n_pairs=1, seed=0).train()
    docs = texts[:batch]
    words = [d.split() for d in docs]  # two disjoint crops per document (query half, key half)
    q = encoder.tokenize([" ".join(w[: len(w) // 2]) for w in words], tower="query")
    k = encoder.tokenize([" ".join(w[len(w) // 2:]) for w in words], tower="doc")
    batch_dict = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                  "k_input_ids": k["input_ids"], "k_attention_mask": k["attention_mask"]}
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        if chunk:
            cache = GradCache(method, chunk)
            loss, _ = cache.forward(batch_dict)
            cache.backward()
        else:
            loss, _ = method(batch_dict)
            loss.backward()
        optimizer.step()
        error = None
    except (MemoryError, RuntimeError) as exc:  # the address-space limit was hit
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_gb": round(peak / 2**20, 2), "rss_before_step_gb": round(before / 2**20, 2),
            "step_s": round(seconds, 1), "error": error,
            "tokens": [list(q["input_ids"].shape), list(k["input_ids"].shape)]}


def bench_memory(ns) -> dict:
    from benchmarks.perf_common import load_average

    out: dict = {"batch": ns.memory_batch, "max_length": 128, "chunk": ns.memory_chunk,
                 "limit_gb": 12, "load_before": load_average(), "rows": []}
    for chunk in (ns.memory_chunk, 0):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_memory", "--child", str(chunk),
                               str(ns.memory_batch), "128", "12"], capture_output=True, text=True,
                              cwd=REPO)
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


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                               float(sys.argv[5]))))
    else:
        sys.exit("use python -m benchmarks.perf memory")
