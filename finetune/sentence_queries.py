"""Label-free training groups from a corpus alone (data.kind=sentences): a sentence of a document
is the query, that document its positive, and the hard negatives are mined for the sentence
(data.mine: BM25 ranks, the source document never among them).

This is the inverse cloze task (Lee, Chang and Toutanova, "Latent Retrieval for Weakly Supervised
Open Domain Question Answering", ACL 2019, arXiv 1906.00300: a sentence is the pseudo-query, its
context the pseudo-evidence; pretrain's `pairs.task=ict`) at the level of whole documents and
trained like a labelled few-shot set: the fine-tuning losses, BM25-mined negatives, whole
documents as keys. ORQA removes the sentence from its context 90% of the time; here it stays in
its document (one text per document is shared by every group), so the task is partly lexical:
find the document holding this sentence among BM25's nearest ones. Spar (Chen et al., "Salient
Phrase Aware Dense Retrieval: Can a Dense Retriever Imitate a Sparse One?", Findings of EMNLP
2022) likewise teaches a dense model lexical matching from sentences taken as queries; its
sampling and teacher are not reproduced here.
data.sentences.source picks the query otherwise: the document's title (its own summary, as
pretrain's `pairs.task=title`), or a crop, a span of consecutive words of its text (Contriever's
cropping, Izacard et al. 2022, at the length of a query). A teacher (teacher.kind=fusion: recipe
domain_distil) can score each query's mined candidates.
No labels and no query file are read: only the corpus of data.path (a BEIR folder's corpus.jsonl
or an MS MARCO folder's collection).
"""
from __future__ import annotations

import logging
from typing import Dict

import datasets
import numpy as np

from twotower.common import data as D
from twotower.common.data import column
from twotower.finetune.args import DataArgs
from twotower.finetune.data import TextStore, TrainingPool
from twotower.finetune.groups import TrainGroup
from twotower.finetune.data_files import load_target_corpus
from twotower.pretrain.sentences import load_splitter

log = logging.getLogger("twotower.finetune")
QUERY_PREFIX = "sentence:"  # query id = prefix + document id: never mistaken for a real query


def sentence_groups(ids, texts, data: DataArgs, pick) -> tuple[list, Dict[str, str], Dict]:
    """One (query id, query text, document) per document in a seeded order until
    data.max_queries (0 = every document): `pick(row, text, rng)` draws the document's query of
    data.sentences.source (None when it has none), with data.sample_seed. Returns the groups, the
    query texts and the counts of documents skipped, by reason."""
    rng = np.random.default_rng(data.sample_seed)
    order = rng.permutation(len(ids))
    groups, queries = [], {}
    skipped = {"empty text": 0, f"no {data.sentences.source} of the allowed length": 0}
    for i in order:
        if data.max_queries and len(groups) >= data.max_queries:
            break
        text = texts(int(i))
        if not text.strip():
            skipped["empty text"] += 1
            continue
        query = pick(int(i), text, rng)
        if query is None:
            skipped[f"no {data.sentences.source} of the allowed length"] += 1
            continue
        qid = QUERY_PREFIX + ids[int(i)]
        queries[qid] = query
        groups.append(TrainGroup(qid, [ids[int(i)]]))
    return groups, queries, skipped


def query_picker(data: DataArgs, corpus, body):
    """pick(row, text, rng) for data.sentences.source: a sentence of the text (Punkt), the
    document's title, or a crop (a span of consecutive words of the text, its length drawn
    uniformly in min_words..max_words within the text); each min_words..max_words words."""
    args = data.sentences

    def fits(query: str) -> bool:
        return args.min_words <= len(query.split()) <= args.max_words

    if args.source == "title":
        def title(i, text, rng):
            found = (corpus[i].get("title") or "").strip()
            return found if fits(found) else None
        return title
    if args.source == "crop":
        def crop(i, text, rng):
            words = text.split()
            if len(words) < args.min_words:
                return None
            length = int(rng.integers(args.min_words, min(args.max_words, len(words)) + 1))
            start = int(rng.integers(len(words) - length + 1))
            return " ".join(words[start:start + length])
        return crop
    split = load_splitter(args.punkt, lambda: (body(i) for i in range(len(corpus))),
                          key="data.sentences.punkt")

    def sentence(i, text, rng):
        eligible = [s for s in split(text) if fits(s)]
        return eligible[int(rng.integers(len(eligible)))] if eligible else None
    return sentence


def sentences_pool(data: DataArgs, teacher: Dict, read: Dict) -> TrainingPool:
    corpus, root = load_target_corpus(data, read)
    ids = column(corpus, "id")

    def body(i: int) -> str:  # read on demand: only the sampled documents are split
        return corpus[i]["text"]
    groups, query_texts, skipped = sentence_groups(ids, body, data,
                                                   query_picker(data, corpus, body))
    if any(skipped.values()):
        log.warning("data.kind=sentences, %s: documents without a query: %s", root,
                    ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    if not groups:
        raise D.DataError(f"data.kind=sentences: no document has a {data.sentences.source} of "
                          f"{data.sentences.min_words}-{data.sentences.max_words} words "
                          "(data.sentences.min_words / max_words)", path=root)
    log.info("data.kind=sentences: %d pseudo-queries, one %s of each of as many sampled "
             "documents (seed %d)", len(groups), data.sentences.source, data.sample_seed)
    docs = TextStore.from_table(corpus, with_title=True)
    queries = TextStore.from_dict(query_texts)

    def mining_data():
        table = datasets.Dataset.from_dict({"id": list(query_texts),
                                            "text": list(query_texts.values())})
        return D.RetrievalData(corpus=corpus, queries=table,
                               qrels={g.qid: {g.positives[0]: 1} for g in groups},
                               name=root.name, split="sentences")
    return TrainingPool(groups, queries, docs, teacher=teacher,
                        source=f"{root} ({data.sentences.source}s as queries: "
                               f"{len(groups)} documents, seed {data.sample_seed})",
                        mining_data=mining_data if data.mine.retriever else None)
