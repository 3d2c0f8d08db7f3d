"""The sentence-transformers side of benchmarks/st_backends.py, run by the Python of a venv with
transformers < 4.58 and sentence-transformers' ONNX and OpenVINO extras (optimum needs them;
the project's own environment has transformers 5). Imports no twotower code.

    VENV/bin/python -m benchmarks.st_backends_venv WORK   (from the checkout)

WORK holds texts.json (documents to time), calibration.json (texts for static int8),
reference.npy (twotower's torch embeddings of the first 64 texts), twotower/ (a model folder
written by `twotower export`) and start/ (the same model saved, nothing exported). Writes
WORK/venv_result.json: (1) twotower's exported files loaded by SentenceTransformer(backend=...),
each against twotower's torch embeddings; (2) docs/s of sentence-transformers' torch fp32 and of
each of its own CPU backends, exported by its own helpers from start/, medians of interleaved
passes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer, __version__
from sentence_transformers.backend import (export_dynamic_quantized_onnx_model,
                                           export_optimized_onnx_model,
                                           export_static_quantized_openvino_model)

from benchmarks.timing import interleaved  # standard library only

BATCH, LENGTH, REPEATS = 32, 256, 3
# twotower's files as sentence-transformers' backends name them (model_kwargs file_name)
LOADED = {"onnx fp32": ("onnx", "onnx/model.onnx"),
          "onnx int8 dynamic": ("onnx", "onnx/model_qint8_avx512_vnni.onnx"),
          "onnx int8 static": ("onnx", "onnx/model_qint8_static.onnx"),
          "openvino": ("openvino", "openvino/openvino_model.xml"),
          "openvino int8 static (NNCF)": ("openvino",
                                          "openvino/openvino_model_qint8_quantized.xml")}


def load(path: Path, backend: str = "torch", file_name: str | None = None) -> SentenceTransformer:
    kwargs = {"model_kwargs": {"file_name": file_name}} if file_name else {}
    model = SentenceTransformer(str(path), device="cpu", backend=backend, **kwargs)
    model.max_seq_length = LENGTH
    return model


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def st_backends(start: Path, scratch: Path, calibration: Path) -> dict[str, SentenceTransformer]:
    """sentence-transformers' own CPU options, each exported by its own helper, then each loaded
    from its file (export_static_quantized_openvino_model quantises the model object it is given
    in place: timed as it is left, its "openvino" row would be the int8 one)."""
    onnx_dir, ov_dir = scratch / "st_onnx", scratch / "st_openvino"
    shutil.copytree(start, onnx_dir)
    onnx = load(onnx_dir, "onnx")  # exports onnx/model.onnx with optimum
    onnx.save_pretrained(str(onnx_dir))
    export_optimized_onnx_model(onnx, "O3", str(onnx_dir))  # onnxruntime's fusions, CPU level
    export_dynamic_quantized_onnx_model(onnx, "avx512_vnni", str(onnx_dir))
    shutil.copytree(start, ov_dir)
    ov = load(ov_dir, "openvino")  # exports openvino/openvino_model.xml with optimum-intel
    ov.save_pretrained(str(ov_dir))
    # its static int8 (NNCF through optimum-intel), calibrated on the texts twotower's export uses
    export_static_quantized_openvino_model(
        ov, None, str(ov_dir), dataset_name=str(calibration), dataset_config_name="default",
        dataset_split="train", column_name="text")
    # openvino: OpenVINO's default precision, which is bf16 on a CPU with bf16 units (as here)
    return {"st fp32": load(start),
            "st onnx fp32": load(onnx_dir, "onnx", "onnx/model.onnx"),
            "st onnx O3": load(onnx_dir, "onnx", "onnx/model_O3.onnx"),
            "st onnx int8 dynamic": load(onnx_dir, "onnx", "onnx/model_qint8_avx512_vnni.onnx"),
            "st openvino (bf16 here)": load(ov_dir, "openvino", "openvino/openvino_model.xml"),
            "st openvino int8 static": load(ov_dir, "openvino",
                                            "openvino/openvino_model_qint8_quantized.xml")}


def main(work: Path) -> None:
    texts = json.loads((work / "texts.json").read_text())
    reference = np.load(work / "reference.npy")
    calibration = work / "calibration"
    calibration.mkdir(exist_ok=True)
    texts_in = json.loads((work / "calibration.json").read_text())
    (calibration / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                     for t in texts_in))
    loaded = {}
    for name, (backend, file_name) in LOADED.items():
        got = load(work / "twotower", backend, file_name).encode(
            texts[:len(reference)], batch_size=BATCH, convert_to_numpy=True)
        loaded[name] = {"file": file_name, "max_abs_diff": float(np.abs(got - reference).max()),
                        "min_cos": min_cos(got, reference)}
    scratch = work / "st_exports"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    systems = st_backends(work / "start", scratch, calibration)
    for model in systems.values():  # warm-up
        model.encode(texts[:BATCH], batch_size=BATCH)
    speed = interleaved({name: (lambda m: lambda t: m.encode(t, batch_size=BATCH))(model)
                         for name, model in systems.items()}, texts, REPEATS, "st fp32")
    (work / "venv_result.json").write_text(json.dumps(
        {"sentence_transformers": __version__, "loaded": loaded, "systems": speed}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
