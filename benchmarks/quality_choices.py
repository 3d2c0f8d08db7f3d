"""What each dev-split run of benchmarks/quality.py changes: name -> overrides of a committed
recipe. Every run here is trained without the 100 held-out training queries and evaluated on
them (quality.DEV_EVAL); the test split chooses nothing."""
MODEL = "bundled:all-MiniLM-L6-v2"

# `dev`: the choices behind recipe `fewshot` (the committed recipe is the best of these)
_BUDGET = ["train.epochs=3", "train.per_device_batch_size=32", "train.mixed_precision=bf16",
           "train.warmup_steps=10"]
DEV_CHOICES = {
    "fewshot as committed": [],
    "lr 2e-5, 1 BM25 negative": [*_BUDGET, "train.lr=2e-5", "data.n_negatives=1"],
    "lr 5e-5, 1 BM25 negative": [*_BUDGET, "train.lr=5e-5", "data.n_negatives=1"],
    "lr 5e-5, 3 BM25 negatives": [*_BUDGET, "train.lr=5e-5", "data.n_negatives=3"],
}

# `label_free_dev`: the choices behind recipe `domain_pretrain` (from the bundled model, the
# corpus only; the labels of the held-out queries only choose)
LABEL_FREE_DEV_CHOICES = {
    "crop, lr 1e-5, 300 steps": ["train.epochs=0", "train.max_steps=300"],
    "ICT, lr 1e-5, 400 steps": ["pairs.task=ict", "pairs.n_pairs=1", "method.relevance_aware=false",
                                "train.epochs=0", "train.max_steps=400"],
    "crop, lr 3e-5, 1 epoch": ["train.lr=3e-5"],
    # the documents' own titles as queries (pretrain/titles.py): one epoch = one pair a document
    "title -> text, lr 1e-5, 1 epoch": ["pairs.task=title", "pairs.n_pairs=1",
                                        "method.relevance_aware=false"],
}
LABEL_FREE_BASE = "crop, lr 1e-5, 300 steps"  # the recipe's choice; base of the ablations below

# `label_free_negatives`: Contriever's ablation of the number of negatives (arXiv 2112.09118,
# ablation section: MoCo queue size, in-batch batch size; figure number not checked offline), on
# the first label-free dev choice; in-batch only = the 31 x 4 key crops of the other chunks of a
# 32-chunk batch (124 negatives per query). Queue 4096 is that dev run itself.
NEGATIVES = {"queue 1024": ["method.queue_size=1024"], "queue 16384": ["method.queue_size=16384"],
             "in-batch only": ["method.name=inbatch"]}

# `ablation`: which seed methods help on this task, one change at a time from the committed
# recipe (first entry of each table = the base every other row is compared with, paired on the
# dev queries). Same steps, batch, learning rate and precision as the base.
FEWSHOT_ABLATION = {
    "fewshot as committed (1 BM25 negative)": [],
    "in-batch negatives only": ["data.n_negatives=0"],
    # dense mining with the start model, the same rank window as the BM25 mining of the recipe
    "dense-mined negative": ["data.mine.retriever=dense", f"data.mine.model={MODEL}"],
    # NV-Retriever's TopK-PercPos filter (arXiv 2407.15831: 95% of the positive's score)
    "dense-mined negative, false-negative filter 0.95": [
        "data.mine.retriever=dense", f"data.mine.model={MODEL}", "data.mine.max_pos_ratio=0.95"],
    # DANCE (arXiv 2107.07773) weights its dual loss 0.1; one mined negative query per group
    "+ dual loss (DANCE, weight 0.1)": ["loss.dance_dual.weight=0.1", "data.n_neg_queries=1"],
    # SamToNe (arXiv 2306.02516) in place of InfoNCE: query-query negatives added, symmetric
    "SamToNe instead of InfoNCE": ["loss.infonce.weight=0", "loss.samtone.weight=1.0",
                                   "loss.samtone.symmetric=true"],
    # PAIR (Findings of ACL 2021) in place of InfoNCE: (1 - 0.1) L_Q + 0.1 L_P, the passage-centric
    # term against the batch's hard negatives; the paper's alpha 0.1, the recipe's tau 0.05
    "PAIR's passage-centric loss instead of InfoNCE": [
        "loss.infonce.weight=0", "loss.pair.weight=1.0", "loss.pair.alpha=0.1",
        "loss.pair.passage_negatives=hard"],
}
# on the first label-free dev choice (crop, lr 1e-5, 300 steps: 4 pairs, relevance-aware)
LABEL_FREE_ABLATION = {
    "4 pairs, relevance-aware (ReContriever)": [],
    "4 pairs, uniform weights": ["method.relevance_aware=false"],
    "1 pair (Contriever's cropping)": ["pairs.n_pairs=1", "method.relevance_aware=false"],
    # chunks cut inside each document (pretrain/chunks.py DocumentChunker), not across them
    "chunks inside documents": ["pairs.chunking=document"],
    # no label-free training at all: the start model on the same dev corpus slice (None: an
    # evaluation in process, quality_runs.start_model_dev, not a training run)
    "no training (the start model)": None,
}

# `curve_dev`: how many steps a small few-shot sample gets. At 8 or 32 sampled queries the
# committed 3 epochs are 6 steps, fewer than the recipe's 10 warmup steps; train.min_steps gives
# more passes over the sample. Run on 8 and 32 sampled queries (sample 0), dev split.
CURVE_DEV_CHOICES = {
    "as committed (3 epochs)": [],
    "at least 25 steps": ["train.min_steps=25"],
    "at least 75 steps (the 809-query run's count)": ["train.min_steps=75"],
}
