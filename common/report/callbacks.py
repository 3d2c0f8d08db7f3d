"""The Trainer's callbacks (twotower.common.train.callbacks) for what `recipe.eval` asks for:
retrieval metrics on `eval.data` during and after training, with the final run.trec, report.md
and report.html in output_dir/eval; the embedding-space diagnostics logged to tensorboard; and
the saved model's card (common/report/model_card.py)."""
from __future__ import annotations

from accelerate import Accelerator

from twotower.common.eval.evaluate import DenseEvaluator
from twotower.common.eval.outputs import write_outputs
from twotower.common.recipe.args import EvalArgs
from twotower.common.report.analyze import AnalyzeArgs, diagnostics_evaluator, log_diagnostics
from twotower.common.report.model_card import CardFacts, ModelCard
from twotower.common.train.callbacks import TrainerCallback, TrainPoint

# a small sample, the same at every evaluation: 100 queries, their judged documents + 300 others
DIAGNOSTICS_SAMPLE = AnalyzeArgs(max_queries=100, max_docs=300, projection="pca")


class RetrievalEvaluation(TrainerCallback):
    """Dense retrieval on the evaluator's data; on several processes each encodes a slice."""

    def __init__(self, evaluator: DenseEvaluator, recipe_yaml: str | None = None,
                 before_training: bool = False):
        self.evaluator, self.recipe_yaml = evaluator, recipe_yaml
        self.evaluate_before_training = before_training

    def on_train_begin(self, accelerator: Accelerator) -> None:
        self.every_process = self.evaluator.shard = accelerator.num_processes > 1

    def on_evaluate(self, point: TrainPoint) -> dict[str, float]:
        return self.evaluator(point.encoder, tag=f"step-{point.step:08d}")

    def on_train_end(self, point: TrainPoint, metrics: dict[str, float]) -> None:
        if self.evaluator.last is None:
            return
        write_outputs(self.evaluator.last, point.output_dir / "eval", overwrite=True,
                      data=self.evaluator.data, extra={"step": point.step},
                      recipe_yaml=self.recipe_yaml)


class EmbeddingDiagnostics(TrainerCallback):
    """common/report/diagnostics.py's scalars and overview picture, on the main process."""

    def __init__(self, eval_args: EvalArgs, sample: AnalyzeArgs = DIAGNOSTICS_SAMPLE):
        self.eval_args, self.sample = eval_args, sample
        self.diagnose = None

    def on_train_begin(self, accelerator: Accelerator) -> None:
        if accelerator.is_main_process and self.diagnose is None:
            self.diagnose = diagnostics_evaluator(self.eval_args, self.sample)

    def on_evaluate(self, point: TrainPoint) -> dict[str, float]:
        scalars, png = self.diagnose(point.encoder)
        log_diagnostics(point.accelerator, point.step, scalars, png)
        return {}  # logged under diagnostics/, not eval/


def callbacks_from_recipe(eval_args: EvalArgs, seed: int, recipe_yaml: str | None = None,
                          card: CardFacts | None = None) -> list[TrainerCallback]:
    """What `eval` asks for: without eval.data nothing; else retrieval metrics, and the
    diagnostics unless eval.diagnostics=false. With `card`: the saved model's model card."""
    found: list[TrainerCallback] = []
    if eval_args.data:
        found.append(RetrievalEvaluation(DenseEvaluator(eval_args, seed=seed), recipe_yaml,
                                         eval_args.before_training))
        if eval_args.diagnostics:
            found.append(EmbeddingDiagnostics(eval_args))
    if card is not None:
        found.append(ModelCard(card))
    return found
