"""data.kind=sentences (finetune/sentence_queries.py): label-free groups from a corpus alone, a
sentence of each document its query, that document its positive, BM25-mined negatives that never
include it; skips counted, bad settings named; a run of finetune/run.py on them."""
import json
import logging

import pytest

from twotower.common.data import DataError
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.sentence_queries import QUERY_PREFIX
from twotower.finetune.sources import build_pool

TOPICS = ["protein", "galaxy", "volcano", "glacier", "neuron", "enzyme"]


def write_corpus(folder, extra=()):
    """A BEIR folder with a corpus only (no queries, no qrels): three sentences per document."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"{t}{i}", "title": f"On {t}s",
             # long last words: Punkt trained on this little text takes a short word that is
             # always followed by a period for an abbreviation
             "text": f"The {t} number {i} was studied by an international collaboration. "
                     f"Its {t} structure differs from sample {i + 1} in several characteristics. "
                     f"Further work on the {t} is planned with complementary measurements."}
            for t in TOPICS for i in range(3)]
    docs += list(extra)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder, docs


def data_overrides(folder, *more):
    return ["data.kind=sentences", f"data.path={folder}", "data.mine.retriever=",
            "data.sentences.punkt=train", *more]


def pool_of(overrides):
    recipe = load_recipe(FinetuneRecipe, "fewshot", overrides)
    return build_pool(recipe.data)


def test_each_group_is_a_sentence_of_its_own_document(tmp_path):
    folder, docs = write_corpus(tmp_path / "c")
    pool = pool_of(data_overrides(folder))
    texts = {d["_id"]: d["text"] for d in docs}
    assert len(pool.groups) == len(docs)  # data.max_queries=0: every document
    for g in pool.groups:
        assert g.qid == QUERY_PREFIX + g.positives[0] and len(g.positives) == 1
        sentence = pool.queries[g.qid]
        assert sentence in texts[g.positives[0]] and 5 <= len(sentence.split()) <= 64
    # the query is one sentence, not the document
    assert all(pool.queries[g.qid] != texts[g.positives[0]] for g in pool.groups)


def test_sampled_documents_and_sentences_follow_the_seed(tmp_path):
    folder, _ = write_corpus(tmp_path / "c")

    def drawn(seed):
        pool = pool_of(data_overrides(folder, "data.max_queries=5", f"data.sample_seed={seed}"))
        return [(g.qid, pool.queries[g.qid]) for g in pool.groups]
    first = drawn(0)
    assert len(first) == 5 and first == drawn(0)
    assert drawn(1) != first


def test_documents_without_a_usable_sentence_are_counted_not_silently_dropped(tmp_path, caplog):
    folder, docs = write_corpus(tmp_path / "c", extra=[
        {"_id": "empty", "title": "t", "text": "   "},
        {"_id": "short", "title": "t", "text": "Too short. Also short."}])
    with caplog.at_level(logging.WARNING, logger="twotower.finetune"):
        pool = pool_of(data_overrides(folder))
    assert {g.positives[0] for g in pool.groups} == {d["_id"] for d in docs[:-2]}
    assert "1 empty text" in caplog.text and "1 no sentence of the allowed length" in caplog.text
    with pytest.raises(DataError, match="min_words"):
        pool_of(data_overrides(folder, "data.sentences.min_words=60"))


def test_bad_settings_and_a_folder_without_a_corpus_are_named(tmp_path):
    with pytest.raises(RecipeError, match="data.sentences"):
        load_recipe(FinetuneRecipe, "fewshot", data_overrides(tmp_path, "data.sentences.min_words=0"))
    with pytest.raises(RecipeError, match="data.sentences.punkt"):
        load_recipe(FinetuneRecipe, "fewshot", data_overrides(tmp_path, "data.sentences.punkt=x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="corpus.jsonl"):
        pool_of(data_overrides(tmp_path / "empty"))


def test_mined_negatives_are_bm25_neighbours_never_the_source_document(tmp_path):
    folder, docs = write_corpus(tmp_path / "c")
    pool = pool_of(data_overrides(folder, "data.mine.retriever=bm25", "data.mine.depth=20",
                                  "data.mine.skip_top=0", "data.mine.window=0", "data.mine.n=20"))
    topic_of = {d["_id"]: d["_id"].rstrip("0123456789") for d in docs}
    for g in pool.groups:
        assert g.negatives and g.positives[0] not in g.negatives
        # the sentence names its topic: BM25's nearest other documents share it
        assert topic_of[g.negatives[0]] == topic_of[g.positives[0]]


def test_a_label_free_run_trains_on_sentences_of_the_corpus(tmp_path):
    from twotower.common.model.encoder import tiny_bert
    from twotower.finetune.run import main

    folder, _ = write_corpus(tmp_path / "c")
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "student")
    result = main(["--recipe", "fewshot", *data_overrides(folder, "data.mine.retriever=bm25"),
                   f"model.name_or_path={tmp_path / 'student'}",
                   f"train.output_dir={tmp_path / 'run'}", "train.per_device_batch_size=4",
                   "train.max_steps=2", "train.warmup_steps=0", "model.max_doc_length=32",
                   "eval.data="])
    assert result["step"] == 2
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_the_trained_punkt_warning_names_the_finetune_key(tmp_path, caplog):
    folder, _ = write_corpus(tmp_path / "c")
    with caplog.at_level(logging.WARNING):
        pool_of(data_overrides(folder))
    punkt = [r.getMessage() for r in caplog.records if "Punkt" in r.getMessage()]
    assert punkt and all("data.sentences.punkt=train" in m and "pairs." not in m for m in punkt)


@pytest.mark.parametrize("source", ["title", "crop"])
def test_titles_and_crops_as_queries_come_from_their_own_document(tmp_path, source):
    untitled = {"_id": "untitled", "title": "", "text": "A document without any title at all here."}
    folder, docs = write_corpus(tmp_path / "c", extra=[untitled])
    by_id = {d["_id"]: d for d in docs}
    pool = pool_of(data_overrides(folder, f"data.sentences.source={source}",
                                  "data.sentences.min_words=2", "data.sentences.max_words=6"))
    assert len(pool.groups) == len(docs) - (source == "title")
    for group in pool.groups:
        doc = by_id[group.positives[0]]
        query = pool.queries[group.qid]
        assert 2 <= len(query.split()) <= 6
        if source == "title":
            assert query == doc["title"]
        else:
            assert f" {query} " in f" {' '.join(doc['text'].split())} "
    again = pool_of(data_overrides(folder, f"data.sentences.source={source}",
                                   "data.sentences.min_words=2", "data.sentences.max_words=6"))
    assert {g.qid: again.queries[g.qid] for g in again.groups} == {
        g.qid: pool.queries[g.qid] for g in pool.groups}
    with pytest.raises(RecipeError, match="data.sentences.source"):
        load_recipe(FinetuneRecipe, "fewshot", data_overrides(folder, "data.sentences.source=x"))
