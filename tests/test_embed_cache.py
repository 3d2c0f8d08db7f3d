"""Corpus embedding cache (common/eval/embed_cache.py) and evaluate_dense(cache_dir=...)."""
import dataclasses

import numpy as np
import pytest
import torch

from tests.fixtures_data import make_beir
from twotower.common.eval.embed_cache import EmbeddingCache, data_fingerprint, model_fingerprint
from twotower.common.eval.evaluate import evaluate_dense, load_eval_data
from twotower.common.model.encoder import tiny_bert


class CountingEncoder:
    """Delegates to a real encoder and counts encode() calls per tower."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, {"doc": 0, "query": 0}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, tower="query", **kwargs):
        self.calls[tower] += 1
        return self.inner.encode(texts, tower=tower, **kwargs)

    def encode_queries(self, texts, **kwargs):
        return self.encode(texts, tower="query", **kwargs)

    def encode_corpus(self, docs, **kwargs):
        raise AssertionError("with cache_dir the corpus goes through the cache")


@pytest.fixture
def beir(tmp_path):
    return load_eval_data(str(make_beir(tmp_path / "beir")), "test")


def test_second_evaluation_does_not_encode_the_corpus(tmp_path, beir):
    enc = CountingEncoder(tiny_bert(normalize=True))
    first = evaluate_dense(enc, beir, k=10, progress=False, cache_dir=tmp_path / "cache")
    second = evaluate_dense(enc, beir, k=10, progress=False, cache_dir=tmp_path / "cache")
    assert enc.calls["doc"] == 1 and enc.calls["query"] == 2
    assert not first.info["timing"]["corpus_cache_hit"] and second.info["timing"]["corpus_cache_hit"]
    assert first.metrics == second.metrics and first.run == second.run
    uncached = evaluate_dense(enc.inner, beir, k=10, progress=False)
    assert uncached.metrics == first.metrics


def test_changed_model_or_corpus_or_settings_misses(tmp_path):
    cache = EmbeddingCache(tmp_path)
    enc = tiny_bert(normalize=True)
    texts = ["a protein in the cell", "rainfall over the ocean", "a vaccine trial"]
    a = cache.encode(enc, texts, progress=False)
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_array_equal(cache.encode(enc, texts, progress=False), a)
    assert (cache.hits, cache.misses) == (1, 1)
    cache.encode(enc, texts[:2] + ["a vaccine trials"], progress=False)  # one character changed
    assert cache.misses == 2
    cache.encode(enc, texts, max_length=4, progress=False)  # other settings
    assert cache.misses == 3
    with torch.no_grad():  # one weight of the model nudged: a fine-tuned copy
        enc.query_model.encoder.layer[-1].output.dense.weight.add_(1e-2)
    changed = cache.encode(enc, texts, progress=False)
    assert cache.misses == 4 and not np.array_equal(changed, a)
    other_pooling = tiny_bert(normalize=True, pooling="cls")
    cache.encode(other_pooling, texts, progress=False)
    assert cache.misses == 5


def test_fingerprints_are_stable_and_unambiguous():
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(["x"]) == data_fingerprint(["x"])
    a, b = tiny_bert(seed=0), tiny_bert(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    b.args = dataclasses.replace(b.args, query_prefix="query: ")
    assert model_fingerprint(a) != model_fingerprint(b)
