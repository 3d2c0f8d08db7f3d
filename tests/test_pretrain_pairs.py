"""Pair construction: chunks re-cut per epoch, crops, multi-pair batches, ICT, Punkt offline,
and the cached tokenisation."""
import json
import logging

import datasets
import numpy as np
import pytest
import torch

from twotower.common.model.encoder import tiny_bert
from twotower.pretrain.args import MethodArgs, PairArgs
from twotower.pretrain.chunks import (Chunker, DocumentChunker, token_documents, token_stream,
                                      tokenize_corpus)
from twotower.pretrain.ict import group_passages, ict_passages
from twotower.pretrain.pairs import CropPairs, ICTPairs, PairCollator, random_crop
from twotower.pretrain.titles import TitlePairs, title_pairs

NOUNS = ["proteins", "cells", "coasts", "rivers", "genes", "stars", "planets", "forests", "cities",
         "laws", "markets", "engines", "bridges", "islands", "vaccines", "storms", "languages",
         "songs", "metals", "birds"]


def _noun(i):
    return NOUNS[i % len(NOUNS)]


# 4 sentences each; every sentence-final word also occurs inside sentences, "Dr." never ends one
TEXTS = [f"The {_noun(i)} of document {i} are studied with {_noun(i + 1)}. Dr. Smith says the "
         f"{_noun(i + 2)} matter for {_noun(i + 3)}. Many {_noun(i + 4)} were measured in "
         f"{_noun(i + 5)}. Results for the {_noun(i + 6)} were compared to {_noun(i + 7)}."
         for i in range(40)]


@pytest.fixture(scope="module")
def encoder():
    return tiny_bert()


@pytest.fixture(scope="module")
def corpus():
    return datasets.Dataset.from_dict({"id": [str(i) for i in range(len(TEXTS))],
                                       "title": [""] * len(TEXTS), "text": TEXTS})


def test_chunks_are_recut_with_a_new_offset_each_epoch():
    stream = np.arange(1000, dtype=np.int32)
    chunker = Chunker(stream, 64, seed=3)
    assert chunker.num_chunks == (1000 - 63) // 64
    offsets = {chunker.offset(e) for e in range(8)}
    assert len(offsets) > 1 and all(0 <= o < 64 for o in offsets)
    for epoch in range(3):
        for i in (0, chunker.num_chunks - 1):
            chunk = chunker.chunk(epoch, i)
            assert len(chunk) == 64 and chunk[0] == chunker.offset(epoch) + 64 * i
            assert np.array_equal(chunk, np.arange(chunk[0], chunk[0] + 64))
    with pytest.raises(ValueError, match="too few for chunks of pairs.chunk_length=600"):
        Chunker(stream, 600, seed=0)


def _documents_cut_slowly(lengths, chunk_length):
    """pairs.chunking=document written out: each document alone, in ceil(n / L) equal pieces."""
    out, start = [], 0
    for n in lengths:
        k = -(-n // chunk_length)
        out += [(start + j * n // k, start + (j + 1) * n // k) for j in range(k)]
        start += n
    return out


def test_document_chunks_stay_inside_one_document():
    lengths = [300, 60, 0, 128, 129, 1, 700]
    stream = np.arange(sum(lengths), dtype=np.int32)
    chunker = DocumentChunker(stream, np.array(lengths), 128)
    expected = _documents_cut_slowly(lengths, 128)
    assert chunker.num_chunks == len(expected) == 3 + 1 + 0 + 1 + 2 + 1 + 6
    assert chunker.empty_documents == 1
    ends = np.cumsum(lengths)
    for epoch in (0, 1):  # the same cut every epoch
        got = []
        for i in range(chunker.num_chunks):
            chunk = chunker.chunk(epoch, i)
            got.append((int(chunk[0]), int(chunk[-1]) + 1))
            assert 1 <= len(chunk) <= 128
            # first and last token in the same document
            assert np.searchsorted(ends, chunk[0], "right") == np.searchsorted(ends, chunk[-1],
                                                                                  "right")
        assert got == expected
    covered = np.concatenate([chunker.chunk(0, i) for i in range(chunker.num_chunks)])
    assert np.array_equal(covered, stream)  # every token in exactly one chunk
    with pytest.raises(ValueError, match="lengths sum to 10"):
        DocumentChunker(stream, np.array([10]), 128)
    with pytest.raises(IndexError):
        chunker.chunk(0, chunker.num_chunks)


def test_recipe_chunking_document_builds_crops_from_one_document(encoder, corpus):
    from twotower.common.recipe.config import load_recipe
    from twotower.pretrain.args import PretrainRecipe
    from twotower.pretrain.dataset import pairs_from_corpora

    docs = [encoder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    stream, lengths = token_documents([corpus], encoder.tokenizer)
    assert lengths.tolist() == [len(d) for d in docs] and len(stream) == sum(lengths)
    # chunks of 16 tokens: each ~40-token document gives 3; a stream chunk often spans two
    overrides = ["pairs.chunk_length=16", "pairs.augmentation=[none]", "pairs.n_pairs=2",
                 "data.corpora=[unused]"]
    by_mode = {}
    for mode in ("stream", "document"):
        recipe = load_recipe(PretrainRecipe, "recontriever_cpu",
                             [*overrides, f"pairs.chunking={mode}"])
        dataset, _ = pairs_from_corpora([corpus], recipe, encoder)
        in_one = []
        for i in range(len(dataset)):
            start, chunk = dataset.chunker.start(0, i), dataset.chunker.chunk(0, i)
            doc = int(np.searchsorted(np.cumsum(lengths), start, "right"))
            offset = start - int(np.sum(lengths[:doc]))
            in_one.append(list(chunk) == docs[doc][offset:offset + len(chunk)])
            item = dataset[i]
            for ids, (s, e) in zip([item["query"], *item["keys"]], item["spans"]):
                assert list(ids[1:-1]) == list(chunk[s:e])
        by_mode[mode] = in_one
    assert all(by_mode["document"]) and len(by_mode["document"]) == sum(-(-lengths // 16))
    assert not all(by_mode["stream"])  # the difference the option exists for
    from twotower.common.recipe.config import RecipeError
    with pytest.raises(RecipeError, match="pairs.chunking=document.*pairs.task=ict"):
        load_recipe(PretrainRecipe, "recontriever_cpu",
                    [*overrides, "pairs.chunking=document", "pairs.task=ict", "pairs.n_pairs=1"])


def test_crop_lengths_within_bounds_and_from_the_same_chunk(encoder):
    rng = np.random.default_rng(0)
    for _ in range(500):
        s, e = random_crop(256, 0.1, 0.5, rng)
        assert int(256 * 0.1) <= e - s <= int(256 * 0.5) and 0 <= s < e <= 256
    stream = np.arange(2000, 2000 + 5000, dtype=np.int32)  # every token unique
    args = PairArgs(chunk_length=100, ratio_min=0.1, ratio_max=0.5, augmentation=["none"],
                    n_pairs=3)
    dataset = CropPairs(Chunker(stream, 100, seed=0), args, encoder.tokenizer, seed=0)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for i in range(0, len(dataset), 7):
            item = dataset[i]
            chunk = dataset.chunker.chunk(epoch, i)
            crops = [item["query"], *item["keys"]]
            assert len(crops) == 4
            for ids, (s, e) in zip(crops, item["spans"]):
                body = ids[1:-1]
                assert 10 <= len(body) <= 50
                assert np.array_equal(body, chunk[s:e])  # a contiguous span of this chunk


def test_items_are_a_pure_function_of_seed_epoch_index(encoder):
    stream = np.arange(2000, 7000, dtype=np.int32)
    make = lambda seed: CropPairs(Chunker(stream, 64, seed), PairArgs(chunk_length=64),
                                  encoder.tokenizer, seed)
    a, b = make(1), make(1)
    b[5]  # order of access does not matter
    for i in (3, 5):
        assert all(np.array_equal(x, y) for x, y in zip(a[i]["keys"], b[i]["keys"]))
    a.set_epoch(1)
    assert not np.array_equal(a[3]["query"], b[3]["query"])


@pytest.mark.parametrize("n_pairs", [1, 2, 3, 4, 5, 6])
def test_multi_pair_batches_have_document_major_keys(encoder, n_pairs):
    from twotower.pretrain.losses.inbatch import InBatch
    from twotower.pretrain.losses.moco import MoCo

    stream = np.arange(2000, 7000, dtype=np.int32)
    args = PairArgs(chunk_length=64, n_pairs=n_pairs, augmentation=["none"])
    dataset = CropPairs(Chunker(stream, 64, 0), args, encoder.tokenizer, 0)
    items = [dataset[i] for i in range(3)]
    batch = PairCollator(encoder.tokenizer.pad_token_id)(items)
    assert batch["q_input_ids"].shape[0] == 3
    assert batch["k_input_ids"].shape[0] == 3 * n_pairs
    assert batch["k_attention_mask"].shape == batch["k_input_ids"].shape
    for i, item in enumerate(items):
        for j, key in enumerate(item["keys"]):
            row = batch["k_input_ids"][i * n_pairs + j]
            assert torch.equal(row[: len(key)], torch.as_tensor(key))
            assert batch["k_attention_mask"][i * n_pairs + j].sum() == len(key)
    method_args = MethodArgs(relevance_aware=True, queue_size=64, norm_query=True, norm_doc=True)
    for method in (InBatch(encoder, method_args, n_pairs), MoCo(encoder, method_args, n_pairs)):
        loss, stats = method(batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert stats["weight_max"] >= 1 / n_pairs - 1e-6


def test_ict_query_is_removed_from_the_key_with_the_configured_probability(encoder):
    sentences = [np.arange(2000 + 10 * s, 2000 + 10 * s + 4 + s) for s in range(6)]  # unique ids
    passages = [sentences[:3], sentences[3:]]
    args = PairArgs(task="ict", ict_remove_prob=0.75, augmentation=["none"])
    dataset = ICTPairs(passages, args, encoder.tokenizer, seed=0, max_query_length=64,
                       max_doc_length=256)
    removed = 0
    total = 0
    for epoch in range(200):
        dataset.set_epoch(epoch)
        for i in range(2):
            item = dataset[i]
            query, key = item["query"][1:-1], item["keys"][0][1:-1]
            pick = item["spans"][0][0]
            assert np.array_equal(query, passages[i][pick])
            others = np.concatenate([s for j, s in enumerate(passages[i]) if j != pick])
            if item["removed"]:
                assert not set(query) & set(key)
                assert np.array_equal(key, others)
            else:
                assert np.array_equal(key, np.concatenate(passages[i]))
            removed += item["removed"]
            total += 1
    assert abs(removed / total - 0.75) < 0.06


def test_title_pairs_query_the_title_and_key_its_own_text(encoder):
    tok = encoder.tokenizer
    titles = ["Mangrove roots", "", "Glacier retreat", "Volcano gases"]
    texts = ["Roots of mangroves hold the coast together.", "No title here.",
             "Glaciers retreat in warm years.", ""]
    corpus = datasets.Dataset.from_dict({"id": ["a", "b", "c", "d"], "title": titles, "text": texts})
    pairs = title_pairs([corpus], tok)
    assert len(pairs) == 2  # no title or no text: left out
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    args = PairArgs(task="title", augmentation=["none"])
    data = TitlePairs(pairs, args, tok, seed=0, max_query_length=16, max_doc_length=64)
    item = data[1]
    assert decode(item["query"]) == "glacier retreat"
    assert [decode(k) for k in item["keys"]] == ["glaciers retreat in warm years."]
    assert item["query"][0] == tok.cls_token_id and item["keys"][0][-1] == tok.sep_token_id
    # several keys: independent crops of the text, never of the title
    multi = TitlePairs(pairs, PairArgs(task="title", n_pairs=3, augmentation=["none"]), tok,
                       seed=0, max_query_length=16, max_doc_length=64)
    text = pairs[0][1].tolist()
    for key, (start, end) in zip(multi[0]["keys"], multi[0]["spans"][1:]):
        assert key[1:-1].tolist() == text[start:end] and end - start >= 1
    batch = PairCollator(tok.pad_token_id)([multi[0], multi[1]])
    assert batch["k_input_ids"].shape[0] == 6
    untitled = datasets.Dataset.from_dict({"id": ["x"], "title": [""], "text": ["text only"]})
    with pytest.raises(ValueError, match="no document has both a title and a text"):
        title_pairs([untitled], tok)


def test_passages_group_whole_sentences_within_the_budget():
    docs = [[[1] * 5, [2] * 5, [3] * 5], [[4] * 20], [[5] * 3, [6] * 30, [7] * 2]]
    passages, dropped = group_passages(docs, chunk_length=12)
    assert [[int(s[0]) for s in p] for p in passages] == [[1, 2]]
    # [3] alone, [4]*20 cut to 12 alone, [5], [6] cut, [7] alone: single-sentence passages
    assert dropped == 5
    passages, dropped = group_passages(docs, chunk_length=40)
    assert [[int(s[0]) for s in p] for p in passages] == [[1, 2, 3], [5, 6, 7]] and dropped == 1


def test_punkt_is_trained_offline_and_logged_never_downloaded(encoder, corpus, monkeypatch,
                                                               caplog):
    import nltk

    from twotower.pretrain import sentences

    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setattr(sentences, "pretrained_punkt_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="twotower.pretrain"):
        passages = ict_passages([corpus], encoder.tokenizer, chunk_length=256, punkt="auto")
    assert "trained an unsupervised Punkt sentence splitter" in caplog.text
    # Punkt learnt from the corpus alone that "Dr." is an abbreviation, not a sentence end
    assert len(passages) == len(TEXTS) and all(len(p) == 4 for p in passages)
    decoded = encoder.tokenizer.decode(passages[0][1])
    assert decoded.startswith("dr. smith") and decoded.endswith(".")
    with pytest.raises(LookupError, match="pairs.punkt=pretrained .* not installed"):
        sentences.resolved_mode("pretrained")


def test_tokenisation_is_cached(tmp_path, encoder, corpus, monkeypatch):
    from twotower.pretrain import chunks

    calls = []
    original = chunks._Tokenize.__call__
    monkeypatch.setattr(chunks._Tokenize, "__call__",
                        lambda self, batch: calls.append(1) or original(self, batch))
    first = token_stream([corpus], encoder.tokenizer, cache_dir=str(tmp_path))
    n_calls = len(calls)
    second = token_stream([corpus], encoder.tokenizer, cache_dir=str(tmp_path))
    assert n_calls > 0 and len(calls) == n_calls  # the second pass read the cache
    assert np.array_equal(first, second) and list(tmp_path.glob("tokens-*.arrow"))
    expected = sum(len(encoder.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert len(first) == expected
    rows = tokenize_corpus(corpus, encoder.tokenizer, cache_dir=str(tmp_path))
    assert list(first[: len(rows[0]["input_ids"])]) == rows[0]["input_ids"]


def test_corpora_resolve_to_their_corpus_file(tmp_path):
    from twotower.pretrain.chunks import corpus_file, load_corpora

    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text('{"_id": "a", "title": "T", "text": "x y"}\n'
                                       '{"_id": "b", "title": "", "text": "z"}\n')
    marco = tmp_path / "marco"
    marco.mkdir()
    (marco / "collection.tsv").write_text("1\tfirst passage\n2\tsecond passage\n")
    assert corpus_file(beir) == beir / "corpus.jsonl"
    a, b = load_corpora([str(beir), str(marco)], max_docs=1)
    assert (len(a), a[0]["id"], a[0]["text"]) == (1, "a", "x y")
    assert (len(b), b[0]["id"], b[0]["text"]) == (1, "1", "first passage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without corpus.jsonl or collection.tsv"):
        corpus_file(tmp_path / "empty")


def test_the_token_stream_of_a_cached_corpus_is_memory_mapped_and_rebuilt_when_damaged(tmp_path,
                                                                                      encoder):
    """The stream is one int32 .npy file beside the token tables, memory-mapped (processes share
    its pages), equal to the in-memory concatenation; a truncated file is written again."""
    from twotower.common.data import load_corpus
    from twotower.pretrain import chunks

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": str(i), "title": f"t{i}", "text": t}) + "\n"
                            for i, t in enumerate(TEXTS * 3)))
    corpus = load_corpus(path, cache_dir=tmp_path / "k")
    tok = encoder.tokenizer
    stream, lengths = chunks.token_documents([corpus], tok, cache_dir=str(tmp_path / "t"))
    assert isinstance(stream, np.memmap) and stream.dtype == np.int32
    in_memory = chunks.flatten_ids(chunks.tokenize_corpus(corpus, tok, str(tmp_path / "t")))
    assert np.array_equal(stream, in_memory) and lengths.sum() == len(stream)
    assert not isinstance(chunks.Chunker(stream, 4, 0).chunk(0, 1), np.memmap)
    (file,) = (tmp_path / "t").glob("token-stream-*.npy")
    file.write_bytes(file.read_bytes()[:-12])  # a crash mid-write or a damaged disk
    again, _ = chunks.token_documents([corpus], tok, cache_dir=str(tmp_path / "t"))
    assert np.array_equal(again, in_memory)
    # a corpus of other texts is another stream, not the old one
    path.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n"
                            for i, t in enumerate(TEXTS)))
    other, _ = chunks.token_documents([load_corpus(path, cache_dir=tmp_path / "k")], tok,
                                      cache_dir=str(tmp_path / "t"))
    assert len(list((tmp_path / "t").glob("token-stream-*.npy"))) == 2 and len(other) < len(again)
