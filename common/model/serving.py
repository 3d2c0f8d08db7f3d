"""ONNX export and int8 quantisation of a saved encoder for CPU serving (issue #25).

Each tower folder of a saved model (the top folder; with separate towers also doc_tower/) gets
`onnx/model.onnx`: the transformer only, inputs `input_ids`, `attention_mask` (and
`token_type_ids` where the model takes them), output `last_hidden_state` -- the layout and names
sentence-transformers' ONNX backend reads (`SentenceTransformer(path, backend="onnx")`, which
pools itself), exported with `torch.onnx` (dynamo) because `optimum-onnx`, what
sentence-transformers exports with, needs transformers < 4.58. int8 through onnxruntime's
quantisation: dynamic (weights int8, activations quantised per call) into
`onnx/model_qint8_avx512_vnni.onnx`, the name sentence-transformers' own dynamic export gives;
static (activations calibrated on corpus texts, QDQ format) into `onnx/model_qint8_static.onnx`.

OpenVINO (`twotower export --openvino`): model.onnx converted to OpenVINO's IR in
`openvino/openvino_model.xml` (+ .bin), the folder sentence-transformers' OpenVINO backend reads;
with `--int8 static` also `openvino/openvino_model_qint8_quantized.xml`, that IR quantised by
NNCF (post-training, activations calibrated on the same corpus texts, its transformer preset),
the tool and file name sentence-transformers' `export_static_quantized_openvino_model` uses
(through optimum-intel). Run with an explicit inference precision, f32 or bf16 (AMX or
avx512_bf16 units). OpenVINO's own CPU default on such machines is bf16: it is never left to
that default, so "fp32" means fp32.

`OnnxTower` / `OpenVinoTower` run one of those files behind the transformers call signature, so
the Encoder pools, chunks and batches exactly as with the torch tower (`Encoder.load(...,
onnx=FILE)`; the evaluation CLI's `--onnx FILE`). onnx, onnxscript, onnxruntime, openvino and
nncf are the `serve` extra: imported here only when an export or a session is asked for.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from torch import nn

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILES = {"dynamic": "model_qint8_avx512_vnni.onnx", "static": "model_qint8_static.onnx"}
OPENVINO_DIR = "openvino"
OPENVINO_FILE = "openvino_model.xml"  # model.onnx converted
# NNCF's static int8 of it. Converting onnxruntime's static QDQ file instead (what this wrote
# before) ran at 2.19x sentence-transformers' fp32 and lost 0.013 nDCG@10 on SciFact; NNCF's
# quantisation of the IR ran at 6.06x, nDCG@10 0.6507 against fp32's 0.6451 (2026-12-07,
# docs/results.md)
OPENVINO_INT8_FILE = "openvino_model_qint8_quantized.xml"
PRECISIONS = ("f32", "bf16")  # OpenVINO's INFERENCE_PRECISION_HINT
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# attention is exported as transformers' eager attention (additive mask, softmax): the exported
# scaled_dot_product_attention guards fully masked rows with IsNaN + Where over every attention
# matrix, 30-40% of onnxruntime's time (profiled on all-MiniLM-L6-v2, 64 SciFact documents at 256
# tokens); eager: int8 dynamic 1.64x and fp32 1.25x the docs/s, the same embeddings (cos 1.0000)
EXPORT_ATTENTION = "eager"
# the exported graph is checked against the torch tower on a long and a short text: hidden states
# differ by float rounding only (measured 1e-4 on all-MiniLM-L6-v2 at 256 tokens)
CHECK_ATOL = 1e-3
log = logging.getLogger("twotower.serving")


SERVE_EXTRA = ("ONNX export and serving need onnx, onnxscript and onnxruntime: "
               "pip install 'twotower[serve]'")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(SERVE_EXTRA) from exc
    return onnxruntime


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(SERVE_EXTRA.replace("onnxruntime:", "onnxruntime, openvino:")) from exc
    return openvino


def _nncf():
    try:
        import nncf
    except ImportError as exc:
        raise ImportError(SERVE_EXTRA.replace("onnxruntime:", "onnxruntime, openvino, nncf:")
                          ) from exc
    return nncf


def _quantization():
    try:
        import onnxruntime.quantization as quantization
    except ImportError as exc:
        raise ImportError(SERVE_EXTRA) from exc
    return quantization


class _LastHidden(nn.Module):
    """The transformer as the exported graph sees it: named inputs -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          **extra).last_hidden_state


def _input_names(model: nn.Module, tokenizer) -> list[str]:
    accepted = set(inspect.signature(model.forward).parameters)  # follows decorators
    made = set(tokenizer("a", return_tensors="pt"))
    return [n for n in INPUTS if n in accepted and (n in made or n != "token_type_ids")]


def _sample(tokenizer, names, max_length: int) -> dict[str, torch.Tensor]:
    texts = ["a short text", " ".join(["a much longer text about proteins and cells"] * 64)]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    if "token_type_ids" in names and "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return {n: batch[n] for n in names}


def _replace_files(built: Path, target: Path) -> None:
    """Move every file of `built` into `target` (the model file last: a reader never finds a
    model file whose external data is not there yet)."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(built.iterdir(), key=lambda p: p.suffix in (".onnx", ".xml"))
    for file in files:
        os.replace(file, target / file.name)


def export_tower(model: nn.Module, tokenizer, folder: Path, max_length: int) -> Path:
    """`folder/onnx/model.onnx` from a transformers model, checked against it in onnxruntime;
    written in a temporary folder beside it, then moved into place."""
    ort = _onnxruntime()
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's dynamo exporter needs it
        raise ImportError(SERVE_EXTRA)
    names = _input_names(model, tokenizer)
    sample = _sample(tokenizer, names, max_length)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    reference = _LastHidden(model.eval())  # the check: the caller's model, its own attention
    exported = copy.deepcopy(model)  # the caller's model keeps its attention
    if hasattr(exported, "set_attn_implementation"):
        exported.set_attn_implementation(EXPORT_ATTENTION)
    wrapped = _LastHidden(exported)
    target = folder / ONNX_DIR
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".partial-") as tmp:
        program = torch.onnx.export(
            wrapped, tuple(sample[n] for n in names), dynamo=True, input_names=names,
            output_names=["last_hidden_state"],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names}, verbose=False)
        program.save(str(Path(tmp) / FP32_FILE))
        session = ort.InferenceSession(str(Path(tmp) / FP32_FILE),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {n: sample[n].numpy() for n in names})[0]
        with torch.no_grad():
            want = reference(*(sample[n] for n in names)).numpy()
        error = float(np.abs(got - want).max())
        if not error <= CHECK_ATOL:
            raise RuntimeError(f"the exported {FP32_FILE} differs from the torch model by "
                               f"{error:.2e} (> {CHECK_ATOL}); nothing was written to {target}")
        _replace_files(Path(tmp), target)
    log.info("exported %s (largest difference from torch %.1e)", target / FP32_FILE, error)
    return target / FP32_FILE


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over tokenised corpus texts."""

    def __init__(self, tokenizer, names, texts: Sequence[str], max_length: int, batch: int = 16):
        self.feeds = []
        for start in range(0, len(texts), batch):
            enc = tokenizer(list(texts[start:start + batch]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="np")
            if "token_type_ids" in names and "token_type_ids" not in enc:
                enc["token_type_ids"] = np.zeros_like(enc["input_ids"])
            self.feeds.append({n: enc[n].astype(np.int64) for n in names})
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self):
        self.position = 0


def quantize_int8(folder: Path, mode: str, tokenizer=None, texts: Sequence[str] = (),
                  max_length: int = 256) -> Path:
    """int8 from `folder/onnx/model.onnx`: `dynamic` (per-channel int8 weights, activations
    quantised at run time) or `static` (activations calibrated on `texts`, QDQ; MatMuls only:
    int8 LayerNorm and softmax cost accuracy in transformers)."""
    quant = _quantization()
    source = folder / ONNX_DIR / FP32_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: export the fp32 model first")
    if mode not in INT8_FILES:
        raise ValueError(f"int8 mode must be one of {', '.join(INT8_FILES)}, got {mode!r}")
    target = folder / ONNX_DIR / INT8_FILES[mode]
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        out = Path(tmp) / target.name
        if mode == "dynamic":
            quant.quantize_dynamic(str(source), str(out), weight_type=quant.QuantType.QInt8,
                                   per_channel=True)
        else:
            if not texts or tokenizer is None:
                raise ValueError("static int8 needs calibration texts (--calibration CORPUS)")
            session = _onnxruntime().InferenceSession(str(source),
                                                            providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            quant.quantize_static(
                str(source), str(out), _Calibration(tokenizer, names, texts, max_length),
                quant_format=quant.QuantFormat.QDQ, activation_type=quant.QuantType.QUInt8,
                weight_type=quant.QuantType.QInt8, per_channel=True,
                op_types_to_quantize=["MatMul"])
        _replace_files(Path(tmp), target.parent)
    log.info("wrote %s", target)
    return target


class _ServedTower(nn.Module):
    """A tower run outside torch behind the transformers call: `model(input_ids=...,
    attention_mask=...).last_hidden_state` (a CPU float32 tensor)."""

    names: list[str]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if "token_type_ids" in self.names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = torch.zeros_like(input_ids)
        arrays = {n: feeds[n].detach().cpu().numpy().astype(np.int64) for n in self.names}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.run(arrays)))

    def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def _sha256(*paths: Path, extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class OnnxTower(_ServedTower):
    """An ONNX file in onnxruntime (fp32 or int8, as the file is)."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        # what it computes, whatever the file is called (common/eval/embed_cache.py keys on it)
        self.digest = _sha256(Path(path))

    def run(self, arrays):
        return self.session.run(["last_hidden_state"], arrays)[0]


class OpenVinoTower(_ServedTower):
    """An OpenVINO IR file on the CPU plugin at an explicit inference precision (f32 or bf16)."""

    def __init__(self, path: str | os.PathLike, precision: str = "f32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        ov = _openvino()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        core = ov.Core()
        self.path = str(path)
        self.compiled = core.compile_model(core.read_model(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.names = [i.get_any_name() for i in self.compiled.inputs]
        self.output = self.compiled.output("last_hidden_state")
        self.digest = _sha256(Path(path), Path(path).with_suffix(".bin"), extra=precision)

    def run(self, arrays):
        return np.array(self.request.infer(arrays)[self.output], dtype=np.float32, copy=True)


def served_tower(path: Path, precision: str = "f32") -> _ServedTower:
    """The tower for an exported file: .xml in OpenVINO at `precision`, .onnx in onnxruntime
    (fp32 only: its precision is the file's)."""
    if path.suffix == ".xml":
        return OpenVinoTower(path, precision)
    if precision != "f32":
        raise ValueError(f"{path.name} runs in onnxruntime at the precision it was exported "
                         f"with; {precision} needs an OpenVINO file (twotower export --openvino)")
    return OnnxTower(path)


def export_openvino(folder: Path, tokenizer, max_length: int) -> Path:
    """`folder/openvino/openvino_model.xml` (+ .bin) from `folder/onnx/model.onnx`, fp32 weights
    (the precision is chosen when it runs), checked against onnxruntime."""
    ov = _openvino()
    source = folder / ONNX_DIR / FP32_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: export it first")
    target = folder / OPENVINO_DIR / OPENVINO_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        built = Path(tmp) / target.name
        ov.save_model(ov.convert_model(str(source)), str(built), compress_to_fp16=False)
        reference = OnnxTower(source)
        sample = _sample(tokenizer, reference.names, max_length)
        arrays = {n: v.numpy().astype(np.int64) for n, v in sample.items()}
        error = float(np.abs(OpenVinoTower(built).run(arrays) - reference.run(arrays)).max())
        if not error <= CHECK_ATOL:
            raise RuntimeError(f"the OpenVINO {target.name} differs from {source} by "
                               f"{error:.2e} (> {CHECK_ATOL}); nothing was written")
        _replace_files(Path(tmp), target.parent)
    log.info("wrote %s", target)
    return target


def quantize_openvino(folder: Path, tokenizer, texts: Sequence[str], max_length: int) -> Path:
    """`folder/openvino/openvino_model_qint8_quantized.xml` (+ .bin): NNCF's post-training int8
    of openvino_model.xml, activation ranges calibrated on `texts` (batches of 16, as for
    onnxruntime's static int8), with `ModelType.TRANSFORMER` (it keeps softmax, LayerNorm and the
    other accuracy-sensitive operations out of int8; optimum-intel's default for these models)."""
    ov, nncf = _openvino(), _nncf()
    source = folder / OPENVINO_DIR / OPENVINO_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: convert model.onnx first (--openvino)")
    if not texts:
        raise ValueError("static int8 needs calibration texts (--calibration CORPUS)")
    model = ov.Core().read_model(str(source))
    feeds = _Calibration(tokenizer, [i.get_any_name() for i in model.inputs], texts,
                         max_length).feeds
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                              model_type=nncf.ModelType.TRANSFORMER)
    target = folder / OPENVINO_DIR / OPENVINO_INT8_FILE
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        ov.save_model(quantized, str(Path(tmp) / target.name), compress_to_fp16=False)
        _replace_files(Path(tmp), target.parent)
    log.info("wrote %s", target)
    return target


def tower_folders(path: Path, separate: bool, doc_dir: str) -> dict[str, Path]:
    return {"query": path, "doc": path / doc_dir if separate else path}


def onnx_file(folder: Path, name: str) -> Path:
    """`name` (a file name such as model.onnx or openvino_model.xml, or a path) inside a tower's
    onnx/ folder (.onnx) or openvino/ folder (.xml)."""
    candidate = Path(name)
    sub, pattern = (OPENVINO_DIR, "*.xml") if candidate.suffix == ".xml" else (ONNX_DIR, "*.onnx")
    found = candidate if candidate.is_absolute() else folder / sub / candidate.name
    if not found.is_file():
        present = sorted(p.name for p in (folder / sub).glob(pattern))
        raise FileNotFoundError(f"{found} does not exist; {folder / sub} holds "
                                f"{', '.join(present) or 'no such file'} (twotower export)")
    return found

