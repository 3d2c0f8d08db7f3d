"""`twotower export MODEL`: ONNX (and int8) files for CPU serving in a saved model's folder.

    twotower export runs/fewshot_scifact/model --int8 dynamic static --calibration scifact
    twotower export bundled:all-MiniLM-L6-v2 --output models/minilm --int8 dynamic
    twotower export runs/fewshot_scifact/model --int8 static --calibration scifact --openvino

writes `onnx/model.onnx` (and `onnx/model_qint8_avx512_vnni.onnx`, `onnx/model_qint8_static.onnx`)
in each tower folder (common/model/serving.py), where `SentenceTransformer(path, backend="onnx")`
and `twotower evaluate --model PATH --onnx FILE` find them; `--openvino` also converts model.onnx
to OpenVINO's IR (`openvino/openvino_model.xml`) and, with `--int8 static`, quantises that IR
with NNCF on the same calibration texts (`openvino/openvino_model_qint8_quantized.xml`).
`--output DIR` first saves the model there (both layouts), for a hub id or the bundled model.
Files already there are refused unless `--overwrite`; every file is written beside its target
and moved into place.
"""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Sequence

from twotower.common.data.corpus import column, load_corpus
from twotower.common.data.errors import DataError
from twotower.common.data.resolve import resolve_data
from twotower.common.model.encoder import Encoder, doc_text
from twotower.common.model.export import DOC_TOWER_DIR
from twotower.common.model.loading import resolve_model_path
from twotower.common.model.serving import (FP32_FILE, INT8_FILES, ONNX_DIR, OPENVINO_DIR,
                                           OPENVINO_FILE, OPENVINO_INT8_FILE, export_openvino,
                                           export_tower, quantize_int8, quantize_openvino,
                                           tower_folders)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twotower export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a saved model folder, a hub id or bundled:all-MiniLM-L6-v2")
    p.add_argument("--output", help="save the model here first and export into it (default: "
                   "into the model's own folder)")
    p.add_argument("--int8", nargs="+", choices=tuple(INT8_FILES), default=[],
                   help="also int8: dynamic (weights only calibrated) and/or static (activations "
                   "calibrated on --calibration)")
    p.add_argument("--calibration", metavar="CORPUS",
                   help="corpus file or BEIR folder/name under $TWOTOWER_DATA whose texts "
                   "calibrate --int8 static")
    p.add_argument("--calibration-texts", type=int, default=256,
                   help="texts sampled from it (seed 0)")
    p.add_argument("--openvino", action="store_true", help="also OpenVINO IR files in openvino/ "
                   "(model.onnx converted and, with --int8 static, its NNCF int8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing ONNX / OpenVINO files")
    return p


def calibration_texts(source: str, n: int) -> list[str]:
    """`n` documents of a corpus (a file, or a BEIR folder's corpus.jsonl), sampled with seed 0,
    as BEIR writes them (title, a space, text)."""
    path = resolve_data(source)
    corpus = load_corpus(path / "corpus.jsonl" if path.is_dir() else path)
    if not len(corpus):
        raise DataError("the calibration corpus is empty", path=path)
    rows = random.Random(0).sample(range(len(corpus)), min(n, len(corpus)))
    titles, texts = column(corpus, "title"), column(corpus, "text")
    return [doc_text({"title": titles[i], "text": texts[i]}) for i in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ("static" in ns.int8) != bool(ns.calibration):
        parser.error("--calibration goes with --int8 static, and --int8 static needs it")
    if ns.calibration_texts <= 0:
        parser.error("--calibration-texts must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    encoder = Encoder.load(ns.model)
    folder = Path(ns.output) if ns.output else Path(resolve_model_path(ns.model))
    if ns.output:
        if folder.exists() and any(folder.iterdir()) and not ns.overwrite:
            parser.error(f"--output {folder} is not empty; pass --overwrite or choose another")
        encoder.save(folder)
    towers = tower_folders(folder, encoder.doc_model is not None, DOC_TOWER_DIR)
    names = [FP32_FILE, *(INT8_FILES[m] for m in ns.int8)]
    converted = ([OPENVINO_FILE, *([OPENVINO_INT8_FILE] if "static" in ns.int8 else [])]
                 if ns.openvino else [])
    targets = [*(Path(ONNX_DIR, n) for n in names), *(Path(OPENVINO_DIR, n) for n in converted)]
    found = [str(f / t) for f in set(towers.values()) for t in targets if (f / t).exists()]
    if found and not ns.overwrite:
        parser.error(f"{', '.join(sorted(found))} already exist; pass --overwrite to replace them")
    try:
        texts = calibration_texts(ns.calibration, ns.calibration_texts) if ns.calibration else []
    except DataError as err:
        parser.exit(1, f"error: {err}\n")
    written = []
    for tower, path in towers.items():
        if tower == "doc" and path == towers["query"]:
            continue  # one shared tower, one file
        length = encoder.max_length(tower)
        written.append(export_tower(encoder.tower(tower), encoder.tokenizer, path, length))
        prefixed = [encoder.prefix(tower) + t for t in texts]
        written += [quantize_int8(path, mode, encoder.tokenizer, prefixed, length)
                    for mode in ns.int8]
        if ns.openvino:
            written.append(export_openvino(path, encoder.tokenizer, length))
        if OPENVINO_INT8_FILE in converted:
            written.append(quantize_openvino(path, encoder.tokenizer, prefixed, length))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
