"""twotower's CPU serving against sentence-transformers' own ONNX and OpenVINO backends (#25).

    TWOTOWER_DATA=../shared/data python -m benchmarks.st_backends [--docs 256] [--venv DIR]

sentence-transformers' ONNX and OpenVINO backends need optimum, which needs transformers < 4.58;
this project runs transformers 5. So they run in a venv of their own (made once under
runs/st_backends/venv: the local torch 2.13.0, transformers 4.57.6, sentence-transformers 5.7.0
with optimum-onnx and optimum-intel), by benchmarks/st_backends_venv.py, in the same command:
1. twotower exports the bundled all-MiniLM-L6-v2 (`twotower export --int8 dynamic static
   --calibration scifact --openvino`); in the venv, SentenceTransformer(path, backend="onnx" /
   "openvino", model_kwargs={"file_name": ...}) loads each file, compared with twotower's torch
   embeddings of 64 SciFact documents;
2. docs/s on the first --docs SciFact documents (batch 32, max length 256, medians of 3
   interleaved passes): here, sentence-transformers' torch fp32 and twotower's OpenVINO bf16 and
   NNCF int8; then, in the venv, its torch fp32 and each backend exported by its own helpers
   (its static OpenVINO int8 calibrated on the same 256 documents as twotower's). Each side's
   ratios are against its own sentence-transformers torch fp32, timed in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.perf_encode import scifact_corpus
from benchmarks.perf_train import MODEL, load_average, st_model
from benchmarks.timing import interleaved
from twotower.common.model.encoder import Encoder
from twotower.common.model.export_cli import calibration_texts
from twotower.common.model.export_cli import main as export_main
from twotower.common.recipe.args import ModelArgs
from twotower.common.train.rundir import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# two installs: the extras do not resolve together (optimum-intel 2.2 wants optimum 2.3,
# optimum-onnx 0.1 asks for optimum ~2.1); the ONNX backend ran with optimum 2.3 here
PINS = (["transformers==4.57.6", "sentence-transformers[onnx]==5.7.0"],
        ["optimum-intel[openvino]==2.2.0", "datasets", "huggingface-hub<1.0"])  # hub: transformers
OURS = {"twotower openvino bf16": ("openvino_model.xml", "bf16"),
        "twotower openvino int8 static (NNCF)": ("openvino_model_qint8_quantized.xml", "bf16")}


def make_venv(venv: Path) -> Path:
    python, done = venv / "bin" / "python", venv / "installed"
    if not done.is_file():  # a failed install is started again
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build on this disk
        pins = venv / "constraints.txt"  # never another torch or transformers
        pins.write_text("torch==2.13.0\ntransformers==4.57.6\nhuggingface-hub<1.0\n")
        for packages in PINS:
            subprocess.run([*pip, "-c", str(pins), *packages], check=True)
        # optimum-intel pulls PyPI's torchvision, which cannot import beside that torch
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"])
        done.write_text(" ".join(p for packages in PINS for p in packages) + "\n")
    return python


def prepare(work: Path, docs: int) -> list[str]:
    _, _, texts = scifact_corpus()
    sample = texts[:docs]
    write_atomic(work / "texts.json", json.dumps(sample))
    write_atomic(work / "calibration.json", json.dumps(calibration_texts("scifact", 256)))
    Encoder.load(MODEL).save(work / "start")
    export_main([MODEL, "--output", str(work / "twotower"), "--overwrite", "--int8", "dynamic",
                 "static", "--calibration", "scifact", "--openvino"])
    np.save(work / "reference.npy",
            Encoder.load(str(work / "twotower")).encode(sample[:64], tower="doc", progress=False))
    return sample


def ours(work: Path, sample: list[str]) -> dict:
    st = st_model(256)
    systems = {"st fp32": lambda t: st.encode(t, batch_size=32, show_progress_bar=False)}
    for name, (file, precision) in OURS.items():
        enc = Encoder.load(ModelArgs(name_or_path=str(work / "twotower"), max_doc_length=256),
                           onnx=file, serving_precision=precision)
        systems[name] = (lambda e: lambda t: e.encode(t, tower="doc", batch_size=32,
                                                      progress=False))(enc)
    for fn in systems.values():  # warm-up
        fn(sample[:32])
    return interleaved(systems, sample, 3, "st fp32")


def markdown(r: dict) -> str:
    lines = [f"# twotower vs sentence-transformers' own CPU backends ({r['when']})", "",
             f"`{r['command']}`; {r['docs']} SciFact documents, batch 32, max length 256; load "
             f"{r['load_before']} -> {r['load_after']}; sentence-transformers "
             f"{r['venv']['sentence_transformers']} in the venv.", "",
             "## twotower's exported files loaded by sentence-transformers' backends", "",
             "| file | backend | max abs diff vs twotower torch | min cosine |",
             "|---|---|---|---|"]
    lines += [f"| {v['file']} | {name} | {v['max_abs_diff']:.2e} | {v['min_cos']:.4f} |"
              for name, v in r["venv"]["loaded"].items()]
    lines += ["", "## Speed (each side against its own sentence-transformers torch fp32)", "",
              "| where | system | docs/s | × ST torch fp32 |", "|---|---|---|---|"]
    for where, systems in (("project env", r["ours"]), ("venv", r["venv"]["systems"])):
        lines += [f"| {where} | {n} | {s['docs_per_s']} | {s['speedup_vs_st']} |"
                  for n, s in systems.items()]
    best = {side: max((s["docs_per_s"], n) for n, s in systems.items() if n != "st fp32")
            for side, systems in (("twotower", r["ours"]), ("st", r["venv"]["systems"]))}
    lines += ["", f"twotower's fastest ({best['twotower'][1]}) / sentence-transformers' fastest "
              f"backend ({best['st'][1]}), docs/s: {best['twotower'][0] / best['st'][0]:.2f}×"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--venv", type=Path, default=REPO / "runs" / "st_backends" / "venv")
    ns = p.parse_args(argv)
    work = REPO / "runs" / "st_backends" / "work"
    work.mkdir(parents=True, exist_ok=True)
    python = make_venv(ns.venv)
    sample = prepare(work, ns.docs)
    result = {"command": " ".join(["python -m benchmarks.st_backends", *(argv or sys.argv[1:])]),
              "docs": len(sample), "load_before": load_average(), "ours": ours(work, sample)}
    subprocess.run([str(python), "-m", "benchmarks.st_backends_venv", str(work)], cwd=REPO,
                   check=True, env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                    "HF_HUB_OFFLINE": "1"})
    result["venv"] = json.loads((work / "venv_result.json").read_text())
    result.update(load_after=load_average(),
                  when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_atomic(RESULTS / "st_backends.json", json.dumps(result, indent=2) + "\n")
    write_atomic(RESULTS / "st_backends.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
