"""twotower export (common/model/serving.py, export_cli.py): ONNX files in each tower folder, in
sentence-transformers' layout; encoding through them equals the torch towers (fp32) or stays
close (int8); existing files are refused; a failed check writes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from twotower.common.eval.embed_cache import EmbeddingCache
from twotower.common.model import serving
from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.model.export_cli import main as export_main

TEXTS = ["protein folding in cells", "a delta forms where a river meets the sea",
         " ".join(["markets and law"] * 40)]


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    path = tmp_path_factory.mktemp("serving") / "model"
    tiny_bert(shared_tower=False, dropout=0.0, seed=3).save(path)
    corpus = path.parent / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS * 4)))
    assert export_main([str(path), "--int8", "dynamic", "static", "--calibration",
                        str(corpus), "--calibration-texts", "8"]) == 0
    return path


def test_exported_towers_encode_as_torch_and_int8_stays_close(separate):
    for folder in (separate, separate / "doc_tower"):
        names = sorted(p.name for p in (folder / "onnx").glob("*.onnx"))
        assert names == ["model.onnx", "model_qint8_avx512_vnni.onnx", "model_qint8_static.onnx"]
    torch_enc = Encoder.load(str(separate))
    for tower in ("query", "doc"):
        want = torch_enc.encode(TEXTS, tower=tower, progress=False)
        got = Encoder.load(str(separate), onnx="model.onnx").encode(TEXTS, tower=tower,
                                                                   progress=False)
        np.testing.assert_allclose(got, want, atol=1e-4)
        for name in serving.INT8_FILES.values():
            q = Encoder.load(str(separate), onnx=name).encode(TEXTS, tower=tower, progress=False)
            cos = (q * want).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() > 0.98, (tower, name, cos)
    # the two towers differ, and each runs its own file
    q = Encoder.load(str(separate), onnx="model.onnx")
    assert not np.allclose(q.encode(TEXTS, tower="query", progress=False),
                           q.encode(TEXTS, tower="doc", progress=False))


def test_existing_files_are_refused_and_a_missing_one_named(separate, capsys):
    with pytest.raises(SystemExit):
        export_main([str(separate)])
    assert "already exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="model_qint8_avx512_vnni.onnx"):
        Encoder.load(str(separate), onnx="other.onnx")


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "model"
    enc = tiny_bert(dropout=0.0)
    enc.save(path)
    monkeypatch.setattr(serving, "CHECK_ATOL", -1.0)
    with pytest.raises(RuntimeError, match="differs from the torch model"):
        serving.export_tower(enc.query_model, enc.tokenizer, path, 32)
    assert list((path / "onnx").iterdir()) == []


def test_the_embedding_cache_keeps_onnx_and_torch_apart(separate, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    for onnx in (None, "model_qint8_avx512_vnni.onnx", "model_qint8_static.onnx", None):
        cache.encode(Encoder.load(str(separate), onnx=onnx), TEXTS, progress=False)
    assert (cache.misses, cache.hits) == (3, 1)  # the second torch encoding is the only hit
