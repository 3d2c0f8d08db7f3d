"""twotower export (common/model/serving.py, export_cli.py): ONNX files in each tower folder, in
sentence-transformers' layout (and OpenVINO's IR in openvino/); encoding through them equals the
torch towers (fp32) or stays close (int8, OpenVINO bf16); existing files are refused; a failed
check writes nothing."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import openvino
import pytest

from twotower.common.eval.cli import main as evaluate_main
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
                        str(corpus), "--calibration-texts", "8", "--openvino"]) == 0
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
    # eager attention: no IsNaN + Where guard over every attention matrix (30-40% of the time
    # of the scaled_dot_product_attention export), and the caller's model keeps its attention
    ops = Counter(n.op_type for n in onnx.load(str(separate / "onnx" / "model.onnx")).graph.node)
    assert ops["Softmax"] == 2 and ops["IsNaN"] == 0 and ops["Where"] <= 1, ops  # Where: the mask
    assert torch_enc.query_model.config._attn_implementation != "eager"
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
    for file in (None, "model_qint8_avx512_vnni.onnx", "model_qint8_static.onnx", None):
        cache.encode(Encoder.load(str(separate), onnx=file), TEXTS, progress=False)
    assert (cache.misses, cache.hits) == (3, 1)  # the second torch encoding is the only hit


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openvino_files_encode_as_torch_at_f32_and_close_at_bf16_and_int8(separate):
    for folder in (separate, separate / "doc_tower"):
        assert sorted(p.name for p in (folder / "openvino").iterdir()) == [
            "openvino_model.bin", "openvino_model.xml", "openvino_model_qint8_quantized.bin",
            "openvino_model_qint8_quantized.xml"]
    torch_enc = Encoder.load(str(separate))
    digests = set()
    for tower in ("query", "doc"):
        want = torch_enc.encode(TEXTS, tower=tower, progress=False)
        f32 = Encoder.load(str(separate), onnx="openvino_model.xml")
        np.testing.assert_allclose(f32.encode(TEXTS, tower=tower, progress=False), want,
                                   atol=1e-4)  # f32 is asked for: never OpenVINO's bf16 default
        bf16 = Encoder.load(str(separate), onnx="openvino_model.xml", serving_precision="bf16")
        got = bf16.encode(TEXTS, tower=tower, progress=False)
        assert _cos(got, want).min() > 0.99 and not np.allclose(got, want, atol=1e-4)
        q = Encoder.load(str(separate), onnx="openvino_model_qint8_quantized.xml")
        got = q.encode(TEXTS, tower=tower, progress=False)
        assert _cos(got, want).min() > 0.98 and not np.allclose(got, want, atol=1e-4)
        digests |= {f32.serving_digest(tower), bf16.serving_digest(tower)}
    assert len(digests) == 4  # per tower and per precision: the cache never mixes them
    # NNCF's int8: the inputs of each of the 12 linear layers (2 layers x Q, K, V, output, 2 FFN)
    # go through FakeQuantize, which OpenVINO's CPU plugin runs as int8
    ir = openvino.Core().read_model(str(separate / "openvino" / serving.OPENVINO_INT8_FILE))
    assert Counter(op.get_type_name() for op in ir.get_ops())["FakeQuantize"] >= 12
    with pytest.raises(ValueError, match="needs an OpenVINO file"):
        Encoder.load(str(separate), onnx="model.onnx", serving_precision="bf16")


def test_evaluate_refuses_bf16_with_an_onnx_file(separate, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--model", str(separate), "--data", "scifact", "--onnx", "model.onnx",
                       "--bf16"])
    assert "needs an OpenVINO file" in capsys.readouterr().err
