import json

import numpy as np
import pytest
import torch

from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.model.loading import ModelLoadError
from twotower.common.recipe.args import ModelArgs

TEXTS = ["short", "a somewhat longer sentence about proteins and cells",
         "cats", "Dense retrieval with two towers " * 5]


def _reference_mean_pool(enc: Encoder, texts, tower="query"):
    """Embeddings one text at a time, no padding: what length sorting must not change."""
    rows = []
    with torch.no_grad():
        for t in texts:
            batch = enc.tokenize([t], tower=tower)
            rows.append(enc(batch["input_ids"], batch["attention_mask"], tower=tower)[0].numpy())
    return np.stack(rows)


def test_encode_sorted_batches_equal_one_by_one():
    enc = tiny_bert()
    got = enc.encode(TEXTS, batch_size=3, progress=False)
    np.testing.assert_allclose(got, _reference_mean_pool(enc, TEXTS), atol=1e-5)


def test_cls_pooling_and_normalisation():
    enc = tiny_bert(pooling="cls", normalize=True)
    got = enc.encode(TEXTS, progress=False)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    batch = enc.tokenize(TEXTS[:1])
    with torch.no_grad():
        hidden = enc.query_model(**batch).last_hidden_state[0, 0]
    np.testing.assert_allclose(got[0], (hidden / hidden.norm()).numpy(), atol=1e-5)


def test_prefixes_are_applied_per_tower():
    enc = tiny_bert(query_prefix="query: ", doc_prefix="passage: ")
    plain = tiny_bert()
    q = enc.encode(["x"], tower="query", progress=False)
    np.testing.assert_allclose(q, plain.encode(["query: x"], progress=False), atol=1e-5)
    d = enc.encode_corpus([{"title": "T", "text": "x"}], progress=False)
    np.testing.assert_allclose(d, plain.encode(["passage: T x"], tower="doc", progress=False),
                               atol=1e-5)


def test_separate_towers_are_independent():
    enc = tiny_bert(shared_tower=False)
    assert enc.doc_model is not None and enc.doc_model is not enc.query_model
    with torch.no_grad():
        for p in enc.doc_model.parameters():
            p.add_(0.1)
    q = enc.encode(TEXTS, tower="query", progress=False)
    d = enc.encode(TEXTS, tower="doc", progress=False)
    assert not np.allclose(q, d)


@pytest.mark.parametrize("pooling,normalize,shared", [("mean", True, True), ("cls", False, False)])
def test_sentence_transformers_round_trip(tmp_path, pooling, normalize, shared):
    from sentence_transformers import SentenceTransformer

    enc = tiny_bert(pooling=pooling, normalize=normalize, shared_tower=shared,
                    query_prefix="q: ")
    enc.save(tmp_path / "model")
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    ours = enc.encode(TEXTS, progress=False)
    theirs = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and our own loader restores the settings (pooling, normalisation, towers, prefixes)
    again = Encoder.load(str(tmp_path / "model"))
    assert (again.args.pooling, again.args.normalize) == (pooling, normalize)
    assert (again.doc_model is None) == shared
    np.testing.assert_allclose(again.encode(TEXTS, tower="doc", progress=False),
                               enc.encode(TEXTS, tower="doc", progress=False), atol=1e-5)
    settings = json.loads((tmp_path / "model" / "twotower.json").read_text())
    assert settings["query_prefix"] == "q: "


def test_bundled_model_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = Encoder.load("bundled:all-MiniLM-L6-v2")
    assert (enc.args.pooling, enc.args.normalize) == ("mean", True)
    st = SentenceTransformer(enc.query_model.name_or_path, device="cpu")
    np.testing.assert_allclose(enc.encode(TEXTS, progress=False),
                               st.encode(TEXTS, convert_to_numpy=True), atol=1e-5)


def test_missing_model_path_says_so():
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder.load(ModelArgs(name_or_path="./no/such/model"))


def test_unreachable_hub_id_says_what_to_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="bundled:all-MiniLM-L6-v2"):
        Encoder.load("someone/not-a-cached-model")


def test_compiled_encoding_equals_eager_and_follows_weight_updates():
    enc = tiny_bert()
    texts = TEXTS * 3
    eager = enc.encode(texts, batch_size=4, progress=False)
    compiled = enc.encode(texts, batch_size=4, progress=False, compile=True)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    with torch.no_grad():  # an optimizer step between two evaluations
        for p in enc.query_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    eager_after = enc.encode(texts, batch_size=4, progress=False)
    assert np.abs(eager_after - eager).max() > 1e-3
    np.testing.assert_allclose(enc.encode(texts, batch_size=4, progress=False, compile=True),
                               eager_after, atol=1e-5)  # not the weights of the first compile


def test_inference_options_set_encode_defaults_within_their_block():
    enc = tiny_bert()
    fp32 = enc.encode(TEXTS, progress=False)
    bf16 = enc.encode(TEXTS, progress=False, bf16=True)
    assert np.abs(bf16 - fp32).max() > 1e-4  # autocast did change the arithmetic
    with enc.inference_options(bf16=True):
        np.testing.assert_array_equal(enc.encode(TEXTS, progress=False), bf16)
        np.testing.assert_array_equal(enc.encode(TEXTS, progress=False, bf16=False), fp32)
    np.testing.assert_array_equal(enc.encode(TEXTS, progress=False), fp32)
