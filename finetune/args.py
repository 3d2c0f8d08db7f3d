"""Recipe schema of the fine-tuning stage (`recipes/msmarco_*.yaml`, `pair_two_stage`, ...).

No `from __future__ import annotations` here: OmegaConf reads these annotations at runtime.

A recipe trains one stage from `data` + `loss`, or several stages in a row from `stages`
(a mapping name -> StageArgs, run in file order, each starting from the previous one's model).
Loss weights live only here; a term with weight 0 is not computed.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from twotower.common.eval.fusion import METHODS
from twotower.common.recipe.args import EvalArgs, ModelArgs, TrainArgs, _choice
from twotower.common.recipe.config import RecipeError

DATA_KINDS = ("beir", "msmarco", "triples", "jsonl", "pseudo", "sentences")


# ------------------------------------------------------------------------------------ losses
@dataclass
class InfoNCEArgs:
    weight: float = 0.0
    temperature: float = 0.05  # sentence-transformers MNRL: cosine x scale 20 = tau 0.05


@dataclass
class DanceDualArgs:
    weight: float = 0.0  # DANCE (arXiv 2107.07773) weights the dual loss 0.1
    temperature: float = 0.05
    use_mined_queries: bool = True  # add the groups' mined negative queries (data.n_neg_queries)


@dataclass
class SamToNeArgs:
    weight: float = 0.0
    temperature: float = 0.05
    symmetric: bool = False  # also the document-anchored term with d-d same-tower negatives


@dataclass
class PairArgs:
    weight: float = 0.0
    temperature: float = 0.05
    alpha: float = 0.1  # RocketQA/PAIR: L = (1 - alpha) L_Q + alpha L_P with alpha = 0.1
    # p- of the passage-centric term: "hard" = the hard negatives of the (global) batch,
    # "all" = every other document of the batch (other queries' positives too)
    passage_negatives: str = "hard"

    def validate(self) -> None:
        _choice("loss.pair.passage_negatives", self.passage_negatives, ("hard", "all"))
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"'loss.pair.alpha' must be in [0, 1]; got {self.alpha}")


@dataclass
class MarginMSEArgs:
    weight: float = 0.0
    # student scores are multiplied by this before the margins are taken: a cosine student
    # (margins in [-2, 2]) needs it to reach cross-encoder logit margins; 1 for a dot student
    student_scale: float = 1.0


TEACHER_TERMS = ("margin_mse", "margin_mse_dual", "listwise_kl")  # losses of teacher scores


@dataclass
class ListwiseKLArgs:
    weight: float = 0.0
    temperature: float = 0.05  # the student's: cosine / 0.05, as MNRL's scale 20
    # the teacher's scores / this before the softmax: its scale is the teacher's (a fusion
    # teacher's scores lie in [0, 1]; a cross-encoder's are logits)
    teacher_temperature: float = 0.1
    # false: the list is the negatives alone, the teacher's ranking among them; for pseudo-queries
    # whose positive is their own source document (data.kind=sentences), trivially first
    positive: bool = True


@dataclass
class LossArgs:
    infonce: InfoNCEArgs = field(default_factory=InfoNCEArgs)
    dance_dual: DanceDualArgs = field(default_factory=DanceDualArgs)
    samtone: SamToNeArgs = field(default_factory=SamToNeArgs)
    pair: PairArgs = field(default_factory=PairArgs)
    margin_mse: MarginMSEArgs = field(default_factory=MarginMSEArgs)
    margin_mse_dual: MarginMSEArgs = field(default_factory=MarginMSEArgs)
    listwise_kl: ListwiseKLArgs = field(default_factory=ListwiseKLArgs)

    def active(self) -> Dict[str, float]:
        """name -> weight of every term with a non-zero weight."""
        names = ("infonce", "dance_dual", "samtone", "pair", "margin_mse", "margin_mse_dual",
                 "listwise_kl")
        return {n: getattr(self, n).weight for n in names if getattr(self, n).weight != 0.0}

    def validate(self) -> None:
        for name in ("infonce", "dance_dual", "samtone", "pair"):
            if getattr(self, name).temperature <= 0:
                raise RecipeError(f"'loss.{name}.temperature' must be > 0")
        for name in ("temperature", "teacher_temperature"):
            if getattr(self.listwise_kl, name) <= 0:
                raise RecipeError(f"'loss.listwise_kl.{name}' must be > 0")

    def needs_teacher_scores(self) -> bool:
        return any(getattr(self, name).weight != 0.0 for name in TEACHER_TERMS)


# -------------------------------------------------------------------------------------- data
@dataclass
class PseudoArgs:
    """RocketQA-style denoised pseudo labels (data.kind=pseudo): the teacher scores the top-k
    candidates of unlabelled queries; >= pos_threshold -> positive, <= neg_threshold -> negative."""
    candidates: str = "bm25"  # "bm25" (twotower.common.eval.bm25 over the corpus) or a TREC run file
    top_k: int = 20
    pos_threshold: float = 0.9
    neg_threshold: float = 0.1
    max_positives: int = 1  # most confident ones first
    apply_sigmoid: bool = True  # thresholds on sigmoid(teacher logit), as RocketQA's CE probability

    def validate(self) -> None:
        if self.neg_threshold >= self.pos_threshold:
            raise RecipeError("'data.pseudo.neg_threshold' must be below 'data.pseudo.pos_threshold'")


@dataclass
class SentenceQueryArgs:
    """data.kind=sentences (twotower.finetune.sentence_queries): one sentence of each sampled document is
    its query; data.max_queries documents (0 = all), sampled with data.sample_seed."""
    min_words: int = 5  # shorter sentences (headings, numbers) are not queries
    max_words: int = 64
    punkt: str = "auto"  # twotower.pretrain.sentences: nltk's Punkt model, trained on the corpus if absent
    # the query of a document: a sentence of its text, its title, or a crop (consecutive words of
    # its text, min_words..max_words of them); each stays in its document
    source: str = "sentence"

    def validate(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise RecipeError("'data.sentences' needs 1 <= min_words <= max_words")
        _choice("data.sentences.punkt", self.punkt, ("auto", "pretrained", "train"))
        _choice("data.sentences.source", self.source, ("sentence", "title", "crop"))


@dataclass
class MiningArgs:
    """Hard negatives mined before training (twotower.finetune.mine) when no hard_negatives file is given."""
    retriever: str = ""  # "" = no mining; bm25 | dense | hybrid (BM25 + dense fused)
    model: str = ""  # dense, hybrid: the retriever model
    fusion: str = "rrf"  # hybrid: rrf | wsum (common/eval/fusion.py)
    dense_weight: float = 0.5  # hybrid wsum: (1 - w) BM25 + w dense
    depth: int = 100
    skip_top: int = 0  # ranks (after removing judged positives) skipped at the top
    window: int = 0  # sample from the next `window` ranks (0 = all remaining)
    n: int = 20  # negatives kept per query (the pool the sampler draws k from)
    # false-negative filters on the mining retriever's own scores (twotower.finetune.mine): drop d- with
    # s(q, d-) >= max_pos_ratio * min_pos s(q, d+) (NV-Retriever's TopK-PercPos: 0.95) or
    # s(q, d-) >= max_score; null = off
    max_pos_ratio: Optional[float] = None
    max_score: Optional[float] = None
    bf16: bool = False  # dense: encode under bf16 autocast
    compile: bool = False  # dense: encode with torch.compile + weight freezing
    # dense, hybrid: a folder for the corpus embeddings as on-disk shards, searched exactly shard
    # by shard (a corpus past RAM, e.g. all of MS MARCO; reused while model and corpus match)
    shards: str = ""

    def validate(self) -> None:
        _choice("data.mine.retriever", self.retriever, ("", "bm25", "dense", "hybrid"))
        if self.shards and self.retriever not in ("dense", "hybrid"):
            raise RecipeError("'data.mine.shards' holds dense embeddings: it needs "
                              "'data.mine.retriever' dense or hybrid")
        _choice("data.mine.fusion", self.fusion, METHODS)
        if not 0.0 <= self.dense_weight <= 1.0:
            raise RecipeError(
                f"'data.mine.dense_weight' must be in [0, 1]; got {self.dense_weight}")
        if self.retriever == "hybrid" and (self.max_pos_ratio is not None
                                           or self.max_score is not None):
            raise RecipeError("'data.mine.max_pos_ratio' / 'max_score' filter on a retriever's own "
                              "scores; 'data.mine.retriever=hybrid' has none (fused scores)")
        if self.max_pos_ratio is not None and self.max_pos_ratio <= 0:
            raise RecipeError(f"'data.mine.max_pos_ratio' must be > 0; got {self.max_pos_ratio}")
        if self.retriever in ("dense", "hybrid") and not self.model:
            raise RecipeError(f"'data.mine.retriever={self.retriever}' needs 'data.mine.model'")


@dataclass
class DataArgs:
    # beir: BEIR folder + qrels/<split>.tsv; msmarco: folder of the official files;
    # triples: a triples.train text file; jsonl: {"query", "positives", "negatives", "scores"};
    # pseudo: queries + corpus of `path` labelled by the teacher (see `pseudo`);
    # sentences: the corpus of `path` only, a sentence of each document its query (label-free)
    kind: str = "beir"
    path: str = ""  # a path, or a name under $TWOTOWER_DATA
    split: str = "train"  # beir qrels split
    # msmarco file names inside `path` (or absolute paths)
    collection: str = "collection.tsv"
    queries: str = "queries.tsv"
    qrels: str = "qrels.tsv"
    hard_negatives: str = ""  # hard-negatives jsonl (MS MARCO layout; twotower.finetune.mine writes it)
    negative_systems: List[str] = field(default_factory=list)  # [] = every system in the file
    negatives_per_system: int = 0  # keep the first n of each system's list (0 = all)
    # false-negative filter on the hard-negative pool (needs teacher_scores): drop d- with
    # t(q, d-) > min_pos t(q, d+) - teacher_margin (sentence-transformers' ce_score_margin)
    teacher_margin: Optional[float] = None
    teacher_scores: str = ""  # {qid: {pid: score}} jsonl or pickle
    min_relevance: int = 1  # qrels grade that counts as positive
    n_negatives: int = 1  # hard negatives per group (k); 0 = in-batch negatives only
    n_neg_queries: int = 0  # mined negative queries per group (DANCE, dual Margin-MSE)
    max_queries: int = 0  # few-shot: keep this many training queries (0 = all), sampled with seed
    sample_seed: int = 0
    # a bad line in any of the files above: "raise" (the error names file and line) or "skip"
    # (dropped, counted per file and reason; the count is reported at the end of the run)
    on_error: str = "raise"
    # a group whose negative pool is smaller than k is filled with random corpus documents
    # (never one of its positives); "error" refuses instead
    short_pool: str = "random"
    # tokenise every text the groups can draw once, before the first step (twotower.finetune.tokens);
    # false: tokenise each batch in the collator and keep nothing (less memory, slower steps)
    pretokenize: bool = True
    # batches of groups of similar length (transformers' LengthGroupedSampler: less padding);
    # it decides which groups share a batch, so only losses without in-batch terms allow it
    # (margin_mse, margin_mse_dual); needs pretokenize
    length_grouped: bool = False
    pseudo: PseudoArgs = field(default_factory=PseudoArgs)
    sentences: SentenceQueryArgs = field(default_factory=SentenceQueryArgs)
    mine: MiningArgs = field(default_factory=MiningArgs)

    def validate(self) -> None:
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _choice("data.kind", self.kind, DATA_KINDS)
        if self.mine.retriever and (self.hard_negatives
                                    or self.kind not in ("beir", "msmarco", "sentences")):
            raise RecipeError("'data.mine' mines negatives for beir/msmarco/sentences data "
                              "without a 'data.hard_negatives' file; set one or the other")
        _choice("data.short_pool", self.short_pool, ("random", "error"))
        if self.teacher_margin is not None and not self.teacher_scores:
            raise RecipeError("'data.teacher_margin' needs 'data.teacher_scores'")
        for name in ("n_negatives", "n_neg_queries", "max_queries", "negatives_per_system"):
            if getattr(self, name) < 0:
                raise RecipeError(f"'data.{name}' must be >= 0")


# ------------------------------------------------------------------------------------ teacher
@dataclass
class TeacherArgs:
    model: str = ""  # "" = no teacher; cross-encoder folder/hub id or a bi-encoder
    # cross_encoder (AutoModelForSequenceClassification) | bi_encoder | fusion (BM25 and the
    # bi-encoder `model`, each min-max normalised over a query's candidates, weighted:
    # finetune/fusion_teacher.py)
    kind: str = "cross_encoder"
    dense_weight: float = 0.5  # fusion: (1 - w) BM25 + w dense
    bf16: bool = False  # score under bf16 autocast (AMX on recent CPUs); part of the cache key
    batch_size: int = 32
    max_length: int = 256
    # sqlite cache of (teacher, query, passage) -> score; "" = <train.output_dir>/../teacher_cache.sqlite
    cache: str = ""

    def validate(self) -> None:
        _choice("teacher.kind", self.kind, ("cross_encoder", "bi_encoder", "fusion"))
        if not 0.0 <= self.dense_weight <= 1.0:
            raise RecipeError(f"'teacher.dense_weight' must be in [0, 1]; got {self.dense_weight}")


# ------------------------------------------------------------------------------------- stages
@dataclass
class StageArgs:
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    max_steps: int = 0  # 0 = train.max_steps
    lr: float = 0.0  # 0 = train.lr


@dataclass
class DomainPretrainArgs:
    """domain_adapt: a pretraining run (pretrain stage) before fine-tuning."""
    recipe: str = ""  # "" = no pretraining; else a pretrain recipe name or path
    overrides: List[str] = field(default_factory=list)  # dotted overrides of that recipe


@dataclass
class FinetuneRecipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    teacher: TeacherArgs = field(default_factory=TeacherArgs)
    # several stages in one command (pair_two_stage); when given, `data` and `loss` above are
    # not used and must stay at their defaults
    stages: Dict[str, StageArgs] = field(default_factory=dict)
    pretrain: DomainPretrainArgs = field(default_factory=DomainPretrainArgs)

    def stage_list(self) -> List[tuple]:
        """[(name, StageArgs)] in run order (one unnamed stage without `stages`)."""
        if not self.stages:
            return [("main", StageArgs(data=self.data, loss=self.loss))]
        return list(self.stages.items())

    def validate(self) -> None:
        if self.stages:
            if self.loss.active():
                raise RecipeError("with 'stages', give each stage its loss; the top-level "
                                  f"'loss' must have no weights (found {self.loss.active()})")
            for name, stage in self.stages.items():
                if not stage.loss.active():
                    raise RecipeError(f"'stages.{name}.loss' has no term with a weight != 0")
        elif not self.loss.active():
            raise RecipeError("no loss term has a weight != 0; set e.g. loss.infonce.weight=1")
        for name, stage in self.stage_list():
            where = "data" if name == "main" else f"stages.{name}.data"
            if stage.loss.needs_teacher_scores() and not (
                    stage.data.teacher_scores or self.teacher.model
                    or stage.data.kind in ("jsonl", "pseudo")):
                terms = [f"loss.{t}" for t in stage.loss.active() if t in TEACHER_TERMS]
                raise RecipeError(f"{' and '.join(terms)} need{'s' if len(terms) == 1 else ''} "
                                  f"teacher scores: set '{where}.teacher_scores' or 'teacher.model'")
            if stage.data.kind == "pseudo" and not self.teacher.model:
                raise RecipeError(f"'{where}.kind=pseudo' needs 'teacher.model'")
            if stage.data.teacher_scores and self.teacher.kind == "fusion":
                raise RecipeError(f"'{where}.teacher_scores' and 'teacher.kind=fusion' would mix "
                                  "two teachers' scales in one pool (the fusion's lie in [0, 1], "
                                  "min-max per query): use one of them")
            if stage.data.kind == "pseudo" and self.teacher.kind == "fusion":
                raise RecipeError(f"'{where}.kind=pseudo' thresholds a teacher's score of each "
                                  "pair; 'teacher.kind=fusion' scores a query's candidates "
                                  "together (min-max over them): use a cross_encoder or bi_encoder")
            in_batch = set(stage.loss.active()) - set(TEACHER_TERMS)
            if stage.data.length_grouped and in_batch:
                raise RecipeError(
                    f"'{where}.length_grouped' chooses which groups share a batch, which changes "
                    f"the in-batch negatives of {sorted(in_batch)}; only losses without in-batch "
                    "terms (margin_mse, margin_mse_dual, listwise_kl) allow it")
            if stage.data.length_grouped and not stage.data.pretokenize:
                raise RecipeError(f"'{where}.length_grouped' needs '{where}.pretokenize=true' "
                                  "(lengths come from the kept token ids)")
            if (stage.loss.listwise_kl.weight and not stage.loss.listwise_kl.positive
                    and stage.data.n_negatives < 2):
                raise RecipeError("loss.listwise_kl.positive=false ranks the negatives alone: "
                                  f"'{where}.n_negatives' must be >= 2")
            if stage.loss.margin_mse_dual.weight and stage.data.n_neg_queries <= 0:
                raise RecipeError(f"loss margin_mse_dual needs '{where}.n_neg_queries' > 0")
