"""The pretraining recipe schema: `model`, `train`, `eval` (twotower.common.recipe.args) + `data`, `pairs`,
`method`.

No `from __future__ import annotations` here: OmegaConf reads these annotations at runtime.
Defaults are Contriever's (Izacard et al. 2021, arXiv 2112.09118, and facebookresearch/contriever
src/options.py); the recipes in recipes/ cite their numbers.
"""
from dataclasses import dataclass, field
from typing import List

from twotower.common.recipe.args import EvalArgs, ModelArgs, TrainArgs, _choice
from twotower.common.recipe.config import RecipeError

AUGMENTATIONS = ("none", "delete", "replace", "mask", "shuffle")
MOCO_SEPARATE_TOWERS = (
    "'model.shared_tower=false' is not supported with 'method.name=moco': MoCo embeds the queries "
    "with the query tower and the keys with a momentum copy of that same tower, so the document "
    "tower would never be trained; set model.shared_tower=true, or method.name=inbatch (which "
    "trains both towers)")


@dataclass
class DataArgs:
    # corpora: names under $TWOTOWER_DATA or paths; a BEIR folder (its corpus.jsonl), an MS MARCO
    # folder (its collection.tsv) or a corpus file (jsonl/tsv, see common/data/corpus.py).
    # Several corpora are concatenated into one token stream (contriever samples its corpora with
    # a coefficient instead; here the sizes decide).
    corpora: List[str] = field(default_factory=lambda: ["scifact"])
    # keep only the first N documents of each corpus (0 = all): quick runs and tests
    max_docs_per_corpus: int = 0
    # where tokenised corpora are cached; "" = next to the corpus' own datasets cache
    cache_dir: str = ""
    tokenize_batch_size: int = 1000
    # a bad corpus line (malformed JSON, missing/empty text, duplicate id, ...): "raise" (the
    # error names file and line) or "skip" (counted; the count is reported at the end of the run)
    on_error: str = "raise"

    def validate(self) -> None:
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if not self.corpora:
            raise RecipeError("'data.corpora' is empty: name at least one corpus")


@dataclass
class PairArgs:
    # crop (independent cropping, Contriever §3) | ict (inverse cloze task) | title (a document's
    # title as the query, its text as the key: pretrain/titles.py)
    task: str = "crop"
    # Contriever: "we cut the concatenated text into chunks of 256 tokens", re-chunked each epoch
    # with a new random offset (contriever src/data.py generate_offset). ICT: the passage budget.
    chunk_length: int = 256
    # task=crop -- stream: cut the concatenated corpus, across document ends (Contriever) |
    # document: cut each document on its own into pieces of at most chunk_length tokens
    # (pretrain/chunks.py)
    chunking: str = "stream"
    # crop length ratio ~ U(ratio_min, ratio_max) of the chunk. Contriever's README training
    # command uses ratio_min 0.1, its example script (and ReContriever's) 0.05; ratio_max 0.5.
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    # ReContriever's one-document-multi-pair: one query crop and n_pairs key crops per chunk
    # (paper: 4; its code hard-codes k1..k4). 1 = Contriever.
    n_pairs: int = 1
    # ICT (Lee et al. 2019, ORQA, arXiv 1906.00300): the query sentence is removed from its
    # passage with this probability; ORQA keeps it in the context 10% of the time -> 0.9
    ict_remove_prob: float = 0.9
    # sentence splitting for ICT: auto (nltk's Punkt data if installed, else Punkt trained on the
    # corpus itself, logged) | pretrained (fail if not installed) | train (always train)
    punkt: str = "auto"
    punkt_train_chars: int = 2_000_000  # corpus characters used to train Punkt offline
    # token-level augmentations applied in order, each token with probability prob_augmentation
    # (Contriever: delete, p = 0.1); special tokens are added after augmenting
    augmentation: List[str] = field(default_factory=lambda: ["delete"])
    prob_augmentation: float = 0.1

    def validate(self) -> None:
        _choice("pairs.task", self.task, ("crop", "ict", "title"))
        _choice("pairs.punkt", self.punkt, ("auto", "pretrained", "train"))
        _choice("pairs.chunking", self.chunking, ("stream", "document"))
        if self.chunking == "document" and self.task != "crop":
            raise RecipeError(f"'pairs.chunking=document' cuts crop chunks; pairs.task={self.task} "
                              "has none (ICT passages and title pairs never cross documents)")
        for name in self.augmentation:
            _choice("pairs.augmentation[]", name, AUGMENTATIONS)
        if not 0 < self.ratio_min <= self.ratio_max <= 1:
            raise RecipeError("'pairs.ratio_min'/'pairs.ratio_max' need 0 < min <= max <= 1; got "
                              f"{self.ratio_min}, {self.ratio_max}")
        if self.n_pairs < 1:
            raise RecipeError(f"'pairs.n_pairs' must be >= 1; got {self.n_pairs}")
        if self.task == "ict" and self.n_pairs != 1:
            raise RecipeError("'pairs.n_pairs' must be 1 with pairs.task=ict (one sentence, one "
                              "context per passage)")
        if self.chunk_length < 2:
            raise RecipeError(f"'pairs.chunk_length' must be >= 2; got {self.chunk_length}")
        for key in ("ict_remove_prob", "prob_augmentation"):
            if not 0 <= getattr(self, key) <= 1:
                raise RecipeError(f"'pairs.{key}' must be in [0, 1]; got {getattr(self, key)}")


@dataclass
class MethodArgs:
    name: str = "moco"  # moco | inbatch
    temperature: float = 0.05  # Contriever: --temperature 0.05
    # L2-normalise query / key embeddings inside the loss (contriever --norm_query/--norm_doc,
    # off by default). Independent of model.normalize, which is saved with the model.
    norm_query: bool = False
    norm_doc: bool = False
    # MoCo (He et al. 2020; Contriever §3): queue of past keys, EMA key encoder
    queue_size: int = 131072
    momentum: float = 0.9995
    # run the key encoder with dropout during training. Contriever's flag
    # moco_train_mode_encoder_k is meant to choose, but model.train() puts encoder_k in train
    # mode and the flag is only read when encoder_k is *not* training, so in the released code the
    # key encoder always runs in train mode; true reproduces that.
    key_encoder_train_mode: bool = True
    # ReContriever's relevance-aware loss (arXiv 2306.03166): weight each positive pair by
    # its estimated relevance (no gradient). Separate from pairs.n_pairs so the paper's ablations
    # (multi-pair alone, weighting alone) can be run.
    relevance_aware: bool = False
    # over which pairs the weights are normalised: document (the n_pairs of one chunk, the paper)
    # | batch (all pairs of the global batch: the weighting without one-document-multi-pair)
    relevance_group: str = "document"
    # guard for similarities that are negative or ~0: clamp (w = max(s, eps) / sum max(s, eps);
    # all pairs of a group <= eps -> uniform) | softmax (w = softmax(s / relevance_temperature))
    relevance_guard: str = "clamp"
    relevance_eps: float = 1e-6
    relevance_temperature: float = 1.0
    # scale of the weighted loss: query = sum_j w_j InfoNCE_j averaged over queries (the paper's
    # formula) | pair = mean over all query-key rows of w * InfoNCE, as the released
    # weighted_cross_entropy computes it (n_pairs times smaller with document weights)
    relevance_reduction: str = "query"

    def validate(self) -> None:
        _choice("method.name", self.name, ("moco", "inbatch"))
        _choice("method.relevance_group", self.relevance_group, ("document", "batch"))
        _choice("method.relevance_guard", self.relevance_guard, ("clamp", "softmax"))
        _choice("method.relevance_reduction", self.relevance_reduction, ("query", "pair"))
        if self.temperature <= 0 or self.relevance_temperature <= 0:
            raise RecipeError("'method.temperature' and 'method.relevance_temperature' must be > 0")
        if not 0 <= self.momentum <= 1:
            raise RecipeError(f"'method.momentum' must be in [0, 1]; got {self.momentum}")
        if self.name == "moco" and self.queue_size < 1:
            raise RecipeError(f"'method.queue_size' must be >= 1; got {self.queue_size}")
        if self.relevance_eps <= 0:
            raise RecipeError(f"'method.relevance_eps' must be > 0; got {self.relevance_eps}")


@dataclass
class PretrainRecipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    data: DataArgs = field(default_factory=DataArgs)
    pairs: PairArgs = field(default_factory=PairArgs)
    method: MethodArgs = field(default_factory=MethodArgs)

    def validate(self) -> None:
        if self.method.name == "moco" and not self.model.shared_tower:
            raise RecipeError(MOCO_SEPARATE_TOWERS)
