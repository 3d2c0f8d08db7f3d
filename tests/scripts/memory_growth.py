"""One run of tests/test_scale_memory.py: an MS MARCO-layout collection of N passages is loaded,
trained on (msmarco_mnrl_cpu, a tiny BERT, 2 steps), evaluated (exact search through on-disk
shards) and indexed with BM25, under tracemalloc; prints the bytes traced: held when training
starts, the peak before it, the peak while evaluating (and, for contrast, while evaluating in RAM
without shards), the peak while BM25 indexes and searches, and the collection's text bytes.

    python tests/scripts/memory_growth.py N WORKDIR MODEL

tracemalloc sees every Python object and numpy array (a per-process list of ids or texts, a dict
of pretokenised ids, an embedding matrix) and not what Arrow memory-maps from the datasets cache
or what torch allocates for the model: the peak's growth with N is what the data path copies into
the process. The queries, qrels and hard negatives stay the same size at every N, so only the
collection grows. Block sizes are shrunk (ids hashed and corpus rows encoded per step) so that a
block is smaller than the collection here too: bounded by a block, not by the corpus.
"""
import json
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np

import twotower.common.data.ids as ids
import twotower.common.eval.bm25 as bm25
import twotower.common.eval.corpus_shards as corpus_shards
from twotower.common.data import load_msmarco_collection
from twotower.common.eval.evaluate import evaluate_dense, load_eval_data
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe
from twotower.common.train.trainer import Trainer
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.run import run_recipe

WORDS = ("river bank stone light winter paper garden music history science engine market "
         "island forest letter doctor school animal window signal energy mountain theory "
         "village report season metal ocean planet").split()
TRAIN_QUERIES, DEV_QUERIES = 64, 16


def write_collection(root: Path, n: int) -> int:
    """collection.tsv of n passages (~56 words), fixed-size query/qrels/hard-negative files."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    size = 0
    # bm25.tsv: the same passages without their own number, so that BM25's vocabulary (which
    # grows with a real collection, but far slower than it) stays the same at every n here
    with open(root / "collection.tsv", "w") as f, open(root / "bm25.tsv", "w") as g:
        for pid in range(n):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(30, 80))))
            size += len(text)
            f.write(f"{pid}\t{text} {pid}\n")
            g.write(f"{pid}\t{text}\n")
    pids = rng.choice(n, TRAIN_QUERIES + DEV_QUERIES, replace=False).tolist()
    for name, part in (("train", pids[:TRAIN_QUERIES]), ("dev", pids[TRAIN_QUERIES:])):
        suffix = "" if name == "dev" else ".train"  # load_eval_data reads queries.tsv, qrels.tsv
        with open(root / f"queries{suffix}.tsv", "w") as fq, \
                open(root / f"qrels{suffix}.tsv", "w") as fr:
            for i, pid in enumerate(part):
                fq.write(f"{1000 + i if name == 'train' else 5000 + i}\tpassage {pid} words\n")
                fr.write(f"{1000 + i if name == 'train' else 5000 + i}\t0\t{pid}\t1\n")
    with open(root / "negatives.jsonl", "w") as f:
        for i, pid in enumerate(pids[:TRAIN_QUERIES]):
            negs = rng.choice(n, 8, replace=False).tolist()
            f.write(json.dumps({"qid": 1000 + i, "pos": [pid], "neg": {"bm25": negs}}) + "\n")
    return size


def main(n: int, work: Path, model: str) -> None:
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets")
    ids._BLOCK = bm25._BLOCK = 1000
    corpus_shards.BLOCK_ROWS = corpus_shards.SEARCH_ROWS = 500
    text_bytes = write_collection(work / "data", n)
    recipe = load_recipe(FinetuneRecipe, "msmarco_mnrl_cpu", [
        f"data.path={work / 'data'}", "data.queries=queries.train.tsv",
        "data.qrels=qrels.train.tsv", "data.hard_negatives=negatives.jsonl",
        f"model.name_or_path={model}", "eval.data=", "train.max_steps=2", "train.log_every=1",
        "train.per_device_batch_size=4", f"train.output_dir={work / 'run'}"])
    seen = {}
    train = Trainer.train

    def measured_train(self, *args, **kwargs):  # every store, pool and token cache is alive here
        seen["held_at_first_step"], seen["peak_before_training"] = tracemalloc.get_traced_memory()
        return train(self, *args, **kwargs)
    Trainer.train = measured_train
    tracemalloc.start()
    run_recipe(recipe)
    encoder = Encoder.load(str(work / "run" / "model"))
    data = load_eval_data(work / "data", "dev")
    tracemalloc.reset_peak()
    result = evaluate_dense(encoder, data, k=10, progress=False, shards=work / "shards")
    seen["peak_evaluating"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()  # the in-RAM path, for contrast: texts and embeddings in the process
    evaluate_dense(encoder, data, k=10, progress=False)
    seen["peak_evaluating_in_ram"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()  # BM25 indexed (a block at a time) and searched
    index = bm25.BM25Index(load_msmarco_collection(work / "data" / "bm25.tsv"), progress=False)
    index.search(["q"], ["river bank stone"], k=10)
    seen["peak_bm25"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps({**seen, "text_bytes": text_bytes, "n_docs": result.info["n_docs"]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
