"""Corpus embeddings cached on disk, so that re-evaluating the same model on the same corpus does
not re-encode it (`twotower.common.eval.evaluate.evaluate_dense(..., cache_dir=DIR)`).

An entry is keyed by sha256 of (model fingerprint, data fingerprint, encoding settings):
* model: every parameter and buffer of the encoder (names, shapes, dtypes, bytes) and its
  settings (pooling, normalisation, prefixes, max lengths) — a fine-tuned copy, another step of
  the same run or another pooling all miss;
* data: the exact texts, in order;
* settings: tower, max length, bf16 (bf16 embeddings differ slightly from fp32 ones).
Files are `<key>.npy` plus `<key>.json` (what the key was made of, for people), written to a
temporary name and renamed, so a crash never leaves a truncated entry behind. Entries are never
evicted automatically: delete the folder to reclaim the space.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from twotower.common.data.io import write_bytes_atomic

KEY_VERSION = 1  # bump when the layout or the meaning of a key changes


def model_fingerprint(encoder) -> str:
    """sha256 over the encoder's settings and every tensor of its state_dict."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(encoder.args), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(encoder.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            # bf16 has no numpy dtype: hash the raw bytes through a same-size integer view
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            h.update(raw.numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256(str(len(texts)).encode())
    for text in texts:
        encoded = text.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no ambiguity at joins
        h.update(encoded)
    return h.hexdigest()


class EmbeddingCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.hits = self.misses = 0

    def key(self, model_fp: str, data_fp: str, settings: dict) -> str:
        payload = json.dumps({"v": KEY_VERSION, "model": model_fp, "data": data_fp,
                              "settings": settings}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def encode(self, encoder, texts: Sequence[str], tower: str = "doc", batch_size: int = 64,
               max_length: int | None = None, progress: bool = True,
               bf16: bool | None = None) -> np.ndarray:
        """`encoder.encode(texts, ...)`, from the cache when this exact model, text list and
        settings were encoded before (bf16 None: the encoder's inference_options)."""
        texts = list(texts)
        bf16 = encoder.encode_bf16 if bf16 is None else bf16
        settings = {"tower": tower, "max_length": max_length or encoder.max_length(tower),
                    "bf16": bool(bf16)}
        if encoder.serving_digest(tower):  # ONNX / int8 embeddings are not the torch tower's
            settings["onnx"] = encoder.serving_digest(tower)
        model_fp, data_fp = model_fingerprint(encoder), data_fingerprint(texts)
        key = self.key(model_fp, data_fp, settings)
        path = self.dir / f"{key}.npy"
        if path.is_file():
            emb = np.load(path)
            if emb.shape == (len(texts), encoder.dim):
                self.hits += 1
                return emb
        self.misses += 1
        emb = encoder.encode(texts, tower=tower, batch_size=batch_size, max_length=max_length,
                             progress=progress, bf16=bf16)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, lambda f: np.save(f, emb))
        meta = {"model": getattr(encoder.args, "name_or_path", ""), "model_fingerprint": model_fp,
                "data_fingerprint": data_fp, "n_texts": len(texts), "settings": settings}
        write_bytes_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return emb
