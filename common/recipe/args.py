"""Recipe sections shared by both stages (typed; see common/recipe/config.py for loading).

No `from __future__ import annotations` here: OmegaConf reads these annotations at runtime.
"""
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from twotower.common.recipe.config import RecipeError


def check_ranges(section: str, obj: Any, ranges: dict) -> None:
    """Each `key: (low, high)` of `obj` within [low, high] (None: unbounded), or a RecipeError
    naming '<section>.<key>'."""
    for key, (low, high) in ranges.items():
        value = getattr(obj, key)
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (f">= {low}" if high is None else f"<= {high}" if low is None
                     else f"in [{low}, {high}]")
            raise RecipeError(f"'{section}.{key}' must be {bound}; got {value}")


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        hint = (" (YAML reads an unquoted no/yes/off/on as a boolean: write \"no\")"
                if value in ("True", "False") else "")
        raise RecipeError(f"'{name}' must be one of {', '.join(allowed)}; got '{value}'{hint}")


@dataclass
class ModelArgs:
    # hub id, local path (HF or sentence-transformers folder) or "bundled:all-MiniLM-L6-v2"
    name_or_path: str = "bundled:all-MiniLM-L6-v2"
    # tokenizer source when it differs from the model (e.g. a random-init model); "" = same
    tokenizer: str = ""
    # "auto" reads a sentence-transformers folder's 1_Pooling config, else "mean"
    pooling: str = "auto"
    # None: as the sentence-transformers folder says (Normalize module), else False
    normalize: Optional[bool] = None
    shared_tower: bool = True
    query_prefix: str = ""
    doc_prefix: str = ""
    max_query_length: int = 64
    max_doc_length: int = 256
    # build the architecture from its config with random weights (tests, "from scratch" benchmarks)
    random_init: bool = False
    # config fields changed before building, e.g. {num_hidden_layers: 2, hidden_dropout_prob: 0.0}
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # dropout while training, whatever the family calls the config field (common/model/dropout.py);
    # None = the checkpoint's own (BERT-family 0.1). On CPUs attention dropout costs 2-3x the
    # step (it disables the fused attention kernel); the saved model keeps the checkpoint's value
    attention_dropout: Optional[float] = None
    hidden_dropout: Optional[float] = None
    gradient_checkpointing: bool = False
    # > 0: the encoder runs at most this many texts per transformer call (each slice cut to its
    # longest text) and concatenates; same embeddings and gradients, faster on CPUs where one
    # large call is slower per text than several small ones. 0 = one call per batch
    forward_chunk: int = 0

    def validate(self) -> None:
        _choice("model.pooling", self.pooling, ("auto", "mean", "cls"))
        # the upper bound is the model's position embeddings: twotower.common.model.encoder.check_lengths
        check_ranges("model", self, {"max_query_length": (1, None), "max_doc_length": (1, None),
                                     "forward_chunk": (0, None)})
        for key in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise RecipeError(f"'model.{key}' is {value}; a dropout rate is in [0, 1)")


# Accelerate's tracker names -> the module each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


@dataclass
class TrainArgs:
    output_dir: str = "runs/default"
    # an existing output_dir is resumed with --resume, replaced only with overwrite_output_dir=true
    overwrite_output_dir: bool = False
    # --resume with a recipe that differs from the run's recipe.yaml in a key that changes what is
    # trained (model, data, method, lr, ...) is refused, naming the keys; true accepts the change
    allow_recipe_change: bool = False
    seed: int = 42
    max_steps: int = 1000
    # > 0: train this many passes over the data (ceil(epochs x examples / global batch /
    # accumulation) steps, twotower.common.train.epochs.steps_for_epochs), max_steps staying a cap; a recipe
    # then fits any training-set size: the few-shot sizes of one corpus, or another corpus
    epochs: float = 0.0
    # with epochs: at least this many steps (more passes over a small training set -- a few-shot
    # sample of 8 queries is 2 steps an epoch); max_steps still caps
    min_steps: int = 0
    per_device_batch_size: int = 32
    # > 0: the examples of one optimizer step over ALL processes, the papers' number (Contriever
    # 2,048 = 32 GPUs x 64). The per-device batch follows: global / processes, exactly, or the run
    # is refused; in-batch negatives are gathered over the whole global batch (so no gradient
    # accumulation: it would split the contrastive batch -- bound memory with grad_cache_chunk).
    # per_device_batch_size is then replaced (the log says by what). 0 = per_device_batch_size
    global_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: str = "linear"  # linear | cosine | constant (all after linear warmup)
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast through Accelerate)
    device: str = "auto"  # auto (GPU when there is one) | cpu
    log_every: int = 10
    # Accelerate's trackers (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive), each
    # installed; [] logs nothing. The diagnostics picture goes to tensorboard only.
    log_with: List[str] = field(default_factory=lambda: ["tensorboard"])
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones deleted after a new one is complete)
    eval_every: int = 0  # steps; 0 = only at the end (when eval.data is set)
    num_workers: int = 0
    # a non-finite loss: "stop" (raise, naming the step and batch ids; no checkpoint written)
    # or "skip" (drop that step's update, count it)
    nonfinite_loss: str = "stop"
    # GradCache (common/model/grad_cache.py): embed in chunks of this many rows without a graph, then
    # re-embed chunk by chunk with one: the contrastive batch is no longer bounded by memory.
    # 0 = off. Gradients equal the uncached ones (tests/test_grad_cache.py).
    grad_cache_chunk: int = 0
    # the encoder towers under torch.compile (inductor, dynamic shapes) in training mode; the
    # first step compiles (logged). Same gradients as eager within float tolerance
    # (tests/test_train_compile.py); evaluation and encoding are not affected
    compile: bool = False

    def validate(self) -> None:
        if self.compile and self.grad_cache_chunk:
            raise RecipeError("'train.compile' with 'train.grad_cache_chunk' is not supported "
                              "(GradCache re-runs the towers outside the compiled step); set one")
        _choice("train.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        if self.epochs < 0:
            raise RecipeError("'train.epochs' must be >= 0 (0 = use train.max_steps)")
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choice("train.nonfinite_loss", self.nonfinite_loss, ("stop", "skip"))
        _choice("train.device", self.device, ("auto", "cpu"))
        for tracker in self.log_with:
            _choice("train.log_with", tracker, tuple(TRACKERS))
            if importlib.util.find_spec(TRACKERS[tracker]) is None:
                raise RecipeError(f"'train.log_with' names {tracker}, which is not installed: "
                                  f"pip install {TRACKERS[tracker]}, or leave it out")
        check_ranges("train", self, {
            "max_steps": (1, None), "min_steps": (0, None), "per_device_batch_size": (1, None),
            "global_batch_size": (0, None), "gradient_accumulation_steps": (1, None),
            "warmup_steps": (0, None), "log_every": (1, None), "save_every": (0, None),
            "keep_last": (1, None), "eval_every": (0, None), "num_workers": (0, None),
            "grad_cache_chunk": (0, None), "weight_decay": (0, None), "max_grad_norm": (0, None),
            "adam_beta1": (0, 1), "adam_beta2": (0, 1)})
        for key in ("lr", "adam_eps"):
            if not getattr(self, key) > 0:
                raise RecipeError(f"'train.{key}' must be > 0; got {getattr(self, key)}")
        if self.global_batch_size and self.gradient_accumulation_steps != 1:
            raise RecipeError(
                "'train.global_batch_size' keeps every in-batch negative in one step, so "
                "'train.gradient_accumulation_steps' must be 1 (it would split the batch); "
                "bound memory with 'train.grad_cache_chunk' instead")


@dataclass
class EvalArgs:
    data: str = ""  # dataset name or path (BEIR folder); "" = no evaluation during training
    split: str = "test"
    batch_size: int = 64
    # quick dev evaluation: sample this many queries / keep all judged docs plus this many others
    max_queries: int = 0
    max_docs: int = 0
    metrics: List[str] = field(
        default_factory=lambda: ["nDCG@10", "RR@10", "AP@100", "R@10", "R@100", "R@1000"]
    )
    # a dev split carved from `split`: evaluate on `holdout` of its judged queries (chosen by a
    # seeded hash, twotower.common.eval.evaluate.holdout_queries); a fine-tuning stage trained on the same data
    # and split leaves them out. For choices made without looking at the test split.
    holdout: int = 0
    holdout_seed: int = 0
    # encoding speed (README, Performance): bf16 autocast (embeddings differ from fp32 by ~1e-3;
    # CPUs with AVX512_BF16 and GPUs), and torch.compile with weight freezing (fp32 ~1.9x here,
    # after 20-60 s of compilation per process, and again whenever the weights changed)
    bf16: bool = False
    compile: bool = False
    before_training: bool = False  # also evaluate the starting model
    # BEIR's protocol: a retrieved document with the query's own id is not scored (ArguAna, Quora)
    ignore_identical_ids: bool = True
    # embedding-space diagnostics (common/report/analyze.py) logged to tensorboard at each evaluation,
    # on a small sample (100 queries, their judged documents + 300 others; PCA picture)
    diagnostics: bool = True
    # a corpus past RAM (MS MARCO's 8.8 M passages: 13 GB of float32 embeddings at 384 dims):
    # each evaluation encodes the corpus a block at a time into on-disk shards under this folder
    # (step-NNNNNNNN/; the previous evaluation's removed once the next is done, the last kept)
    # and searches them exactly, a block at a time (common/eval/corpus_shards.py); "" = in RAM
    shards: str = ""
    shards_dtype: str = "float16"  # or float32; fp16's nDCG effect: docs/results.md (#23)

    def validate(self) -> None:
        check_ranges("eval", self, {"batch_size": (1, None), "max_queries": (0, None),
                                    "max_docs": (0, None), "holdout": (0, None)})
        if self.shards_dtype not in ("float16", "float32"):
            raise RecipeError(f"eval.shards_dtype={self.shards_dtype!r}: float16 or float32")
