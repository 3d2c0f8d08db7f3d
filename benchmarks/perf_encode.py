"""Encoding speed and quality for CPU serving (issue #25), `python -m benchmarks.perf encode`.

One run, bundled all-MiniLM-L6-v2, SciFact documents, equal batch size and max length:
sentence-transformers torch fp32 and bf16 (its ONNX and OpenVINO backends need `optimum`, which
needs transformers < 4.58, so they cannot run beside transformers 5 here), twotower's Encoder in
torch (fp32, bf16 autocast, each also under torch.compile), and the model exported by `twotower
export` (timed as setup): ONNX fp32 / int8 dynamic / int8 static in onnxruntime, and OpenVINO's IR
at f32, at bf16 (bf16 units here) and its static int8 (NNCF's, calibrated on the same 256
documents as onnxruntime's static int8; what is left in floating point at bf16).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.perf_train import MODEL, load_average, st_model, timed
from benchmarks.timing import interleaved
from twotower.common.eval.evaluate import _corpus_rows, judged_queries, load_eval_data
from twotower.common.eval.metrics import aggregate, per_query
from twotower.common.eval.search import dense_search
from twotower.common.model.encoder import Encoder, doc_text
from twotower.common.model.export_cli import main as export_main
from twotower.common.recipe.args import ModelArgs

# system -> (the exported file it encodes with, OpenVINO's precision; onnxruntime: f32)
SERVED = {"onnx fp32": ("model.onnx", "f32"),
          "onnx int8 dynamic": ("model_qint8_avx512_vnni.onnx", "f32"),
          "onnx int8 static": ("model_qint8_static.onnx", "f32"),
          "openvino fp32": ("openvino_model.xml", "f32"),
          "openvino bf16": ("openvino_model.xml", "bf16"),
          "openvino int8 static": ("openvino_model_qint8_quantized.xml", "bf16")}
TORCH = {"twotower fp32": {}, "twotower bf16": {"bf16": True},
         "twotower fp32 compiled": {"compile": True},
         "twotower bf16 compiled": {"bf16": True, "compile": True}}
SYSTEMS = ("st fp32", "st bf16", *TORCH, *SERVED)
BASE = "st fp32"  # every ratio is against sentence-transformers' default


def scifact_corpus():
    data = load_eval_data("scifact", "test")
    ids, rows = _corpus_rows(data)
    return data, ids, [doc_text(r) for r in rows]


def export_model(folder: Path) -> float:
    """The bundled model saved and exported into `folder`; seconds taken."""
    start = time.perf_counter()
    export_main([MODEL, "--output", str(folder), "--int8", "dynamic", "static",
                 "--calibration", "scifact", "--openvino"])
    return time.perf_counter() - start


def encoders(ns, chosen, folder: Path) -> dict:
    """name -> encode(texts, tower) for each chosen system."""
    bs, length = ns.encode_batch_size, ns.max_length
    out = {}
    for name in chosen:
        if name.startswith("st "):
            st = st_model(length, bf16=name == "st bf16")
            out[name] = (lambda model: lambda t, tower="doc": model.encode(
                t, batch_size=bs, convert_to_numpy=True, show_progress_bar=False))(st)
            continue
        source = str(folder) if name in SERVED else MODEL
        file, precision = SERVED.get(name, (None, "f32"))
        enc = Encoder.load(ModelArgs(name_or_path=source, max_doc_length=length,
                                     max_query_length=length),
                           onnx=file, serving_precision=precision)
        kw = TORCH.get(name, {})
        out[name] = (lambda e, kw: lambda t, tower="doc": e.encode(
            t, tower=tower, batch_size=bs, progress=False, **kw))(enc, kw)
    return out


def bench_encode(ns) -> dict:
    """Docs/s on the first --docs documents (median of --repeats, interleaved, after a warm-up
    pass timed apart: it compiles), and each system's max abs embedding difference from
    sentence-transformers fp32 on 64 of them; with --full, nDCG@10 on SciFact test over the whole
    corpus (5,183 docs) for the --full systems (all chosen ones when none is named)."""
    data, doc_ids, texts = scifact_corpus()
    sample = texts[: ns.docs]
    wanted = {*(ns.encode_systems or SYSTEMS), *(ns.full or ())}
    chosen = [s for s in SYSTEMS if s in wanted]
    if BASE not in chosen:
        chosen.insert(0, BASE)
    out: dict = {"docs": len(sample), "batch_size": ns.encode_batch_size,
                 "max_length": ns.max_length, "threads": torch.get_num_threads(),
                 "load_before": load_average(), "systems": {}}
    with tempfile.TemporaryDirectory(prefix="perf-encode-") as tmp:
        if any(s in SERVED for s in chosen):
            out["export_s"] = round(export_model(Path(tmp) / "model"), 1)
        systems = encoders(ns, chosen, Path(tmp) / "model")
        warmup_s = {name: round(timed(fn, sample[: ns.encode_batch_size])[0], 1)
                    for name, fn in systems.items()}
        ref = systems[BASE](sample[:64])
        for name, speed in interleaved(systems, sample, ns.repeats, BASE).items():
            out["systems"][name] = {
                **speed, "warmup_s": warmup_s[name],
                "max_abs_diff_vs_st": round(float(abs(systems[name](sample[:64]) - ref).max()), 6)}
        if ns.full is not None:
            out["full_corpus"] = full_corpus(data, doc_ids, texts,
                                             {n: systems[n] for n in ns.full or systems})
    out["load_after"] = load_average()
    return out


def full_corpus(data, doc_ids, texts, systems: dict) -> dict:
    qids, qtexts = judged_queries(data)
    full: dict = {}
    for name, fn in systems.items():
        seconds, doc_emb = timed(fn, texts)
        run = dense_search(fn(qtexts, "query"), doc_emb, qids, doc_ids, k=100, similarity="cos")
        full[name] = {"nDCG@10": round(aggregate(per_query(data.qrels, run, ["nDCG@10"]))
                                       ["nDCG@10"], 4),
                      "corpus_s": round(seconds, 1), "docs_per_s": round(len(texts) / seconds, 2)}
    ref = full.get(BASE, {}).get("nDCG@10")
    for s in full.values():
        s["delta_vs_st"] = None if ref is None else round(s["nDCG@10"] - ref, 4)
    return {"docs": len(texts), "queries": len(qids), "systems": full}
