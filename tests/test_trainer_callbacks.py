"""The Trainer calls evaluation and reports only through callbacks (common/train/callbacks.py):
a callback of one's own is called at the points the docstring names, and what it returns is
logged and saved as the run's metrics."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.test_eval_cli import write_beir
from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.recipe.args import EvalArgs, TrainArgs
from twotower.common.recipe.config import RecipeError
from twotower.common.report.callbacks import (EmbeddingDiagnostics, RetrievalEvaluation,
                                              callbacks_from_recipe)
from twotower.common.train.callbacks import TrainerCallback, TrainPoint
from twotower.common.train.trainer import Trainer
from twotower.finetune.args import InfoNCEArgs, LossArgs
from twotower.finetune.data import GroupCollator
from twotower.finetune.method import FinetuneMethod

LOSS = LossArgs(infonce=InfoNCEArgs(weight=1.0))


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"qid": str(i), "query": f"question {i} about topic {i % 3}",
                "positive": f"a passage on topic {i % 3} answering {i}", "negatives": [],
                "neg_queries": []}


class Recorder(TrainerCallback):
    evaluate_before_training = True

    def __init__(self):
        self.calls: list[tuple] = []

    def on_train_begin(self, accelerator) -> None:
        self.calls.append(("begin", accelerator.num_processes))

    def on_evaluate(self, point: TrainPoint) -> dict[str, float]:
        assert isinstance(point.encoder, Encoder)  # the unwrapped encoder, not method or DDP
        self.calls.append(("evaluate", point.step, point.final))
        return {"my_metric": float(point.step)}

    def on_train_end(self, point: TrainPoint, metrics: dict[str, float]) -> None:
        assert (point.output_dir / "model" / "config.json").is_file()  # saved before
        self.calls.append(("end", point.step, point.final, dict(metrics)))


def test_a_callback_of_ones_own_is_called_and_its_metrics_saved(tmp_path):
    encoder = tiny_bert(normalize=True)
    method = FinetuneMethod(encoder, LOSS)
    args = TrainArgs(output_dir=str(tmp_path / "run"), max_steps=4, eval_every=2,
                     per_device_batch_size=4, lr=1e-3, warmup_steps=0, device="cpu", log_every=1)
    recorder = Recorder()
    result = Trainer(args, method, Pairs(), GroupCollator(encoder.tokenize),
                     recipe_yaml="train:\n  max_steps: 4\n", callbacks=[recorder]).train()
    assert recorder.calls == [("begin", 1), ("evaluate", 0, False), ("evaluate", 2, False),
                              ("evaluate", 4, True), ("end", 4, True, {"my_metric": 4.0})]
    assert result["my_metric"] == 4.0 and result["step"] == 4
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"my_metric": 4.0}
    assert (tmp_path / "run" / "recipe.yaml").read_text() == "train:\n  max_steps: 4\n"


def test_no_callback_no_evaluation(tmp_path):
    encoder = tiny_bert(normalize=True)
    args = TrainArgs(output_dir=str(tmp_path / "run"), max_steps=1, per_device_batch_size=4,
                     device="cpu", warmup_steps=0)
    result = Trainer(args, FinetuneMethod(encoder, LOSS), Pairs(),
                     GroupCollator(encoder.tokenize)).train()
    assert set(result) == {"step", "skipped_nonfinite"}
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_what_recipe_eval_asks_for(tmp_path):
    beir_dir = write_beir(tmp_path / "beir")
    assert callbacks_from_recipe(EvalArgs(data=""), seed=0) == []
    found = callbacks_from_recipe(EvalArgs(data=str(beir_dir), before_training=True), seed=0)
    assert [type(c) for c in found] == [RetrievalEvaluation, EmbeddingDiagnostics]
    assert found[0].evaluate_before_training and not found[1].evaluate_before_training
    only = callbacks_from_recipe(EvalArgs(data=str(beir_dir), diagnostics=False), seed=0)
    assert [type(c) for c in only] == [RetrievalEvaluation]


def test_trackers_are_a_recipe_choice(tmp_path):
    """train.log_with goes to Accelerate: [] logs nothing; a tracker that is not installed or not
    known is refused at load, naming the key (wandb and mlflow are not installed here)."""
    encoder = tiny_bert(normalize=True)
    args = TrainArgs(output_dir=str(tmp_path / "run"), max_steps=1, per_device_batch_size=4,
                     device="cpu", warmup_steps=0, log_with=[])
    Trainer(args, FinetuneMethod(encoder, LOSS), Pairs(), GroupCollator(encoder.tokenize)).train()
    assert not list((tmp_path / "run").rglob("events.out.tfevents*"))
    for missing in ("wandb", "mlflow"):
        if importlib.util.find_spec(missing) is None:
            with pytest.raises(RecipeError, match=f"'train.log_with' names {missing}, which is "
                                                  f"not installed: pip install {missing}"):
                TrainArgs(log_with=["tensorboard", missing]).validate()
    with pytest.raises(RecipeError, match="train.log_with"):
        TrainArgs(log_with=["neptune"]).validate()
    TrainArgs(log_with=["tensorboard"]).validate()
