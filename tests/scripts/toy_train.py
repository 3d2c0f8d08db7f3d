"""A minimal stage used by the training-loop tests: in-batch InfoNCE on text pairs, tiny BERT.

Run as `python tests/scripts/toy_train.py OUT_DIR [--resume] [key=value ...]` or under
`accelerate launch`. Dropout is 0 so that runs differing only in process count are comparable.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from twotower.common.model.distributed import gather_with_grad, global_offset
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.args import EvalArgs, ModelArgs, TrainArgs
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.report.callbacks import callbacks_from_recipe
from twotower.common.train.cli import parse_run_args
from twotower.common.train.trainer import Trainer

WORDS = ("protein cell gene brain heart virus drug trial mouse human cancer blood "
         "neuron liver lung vaccine dose risk age sleep").split()


@dataclass
class ToyRecipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    n_pairs: int = 64
    temperature: float = 0.05
    nan_at_step: int = 0  # make the loss NaN at this step (tests of the non-finite policy)
    sleep_per_step: float = 0.0  # slows the run so a test can kill it mid-way


class PairData(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.items = [(f"{WORDS[i % 20]} {WORDS[(3 * i) % 20]} {i}",
                       f"about {WORDS[i % 20]} and {WORDS[(3 * i) % 20]}") for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return idx, self.items[idx]


class ToyInBatch(nn.Module):
    def __init__(self, encoder, temperature, nan_at_step=0, sleep=0.0):
        super().__init__()
        self.encoder, self.temperature, self.nan_at_step = encoder, temperature, nan_at_step
        self.sleep = sleep
        self.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def on_step_skipped(self):  # the Trainer's hook for a step dropped by nonfinite_loss=skip
        self.skipped_steps += 1

    def forward(self, batch):
        self.forward_calls += 1
        time.sleep(self.sleep)
        q = self.encoder(**batch["q"], tower="query")
        d = self.encoder(**batch["d"], tower="doc")
        all_d = gather_with_grad(d)
        offset = global_offset(q.shape[0])
        labels = torch.arange(q.shape[0], device=q.device) + offset
        loss = F.cross_entropy(q @ all_d.T / self.temperature, labels)
        if self.nan_at_step and int(self.forward_calls) == self.nan_at_step:
            loss = loss * float("nan")
        return loss, {"batch_size": float(q.shape[0])}


def main(argv=None):
    run = parse_run_args("toy trainer", argv, default_recipe=None)
    recipe = load_recipe(ToyRecipe, run.recipe if run.recipe != "none" else None, run.overrides)
    encoder = tiny_bert(dropout=0.0, seed=recipe.train.seed,
                        max_query_length=recipe.model.max_query_length,
                        max_doc_length=recipe.model.max_doc_length,
                        gradient_checkpointing=recipe.model.gradient_checkpointing)
    tok = encoder.tokenizer

    def collate(items):
        ids = [str(i) for i, _ in items]
        q = dict(tok([a for _, (a, _) in items], padding=True, return_tensors="pt"))
        d = dict(tok([b for _, (_, b) in items], padding=True, return_tensors="pt"))
        keep = ("input_ids", "attention_mask")
        return {"ids": ids, "q": {k: q[k] for k in keep}, "d": {k: d[k] for k in keep}}

    recipe_yaml = recipe_to_yaml(recipe)
    trainer = Trainer(recipe.train, ToyInBatch(encoder, recipe.temperature, recipe.nan_at_step,
                                                 recipe.sleep_per_step),
                      PairData(recipe.n_pairs), collate, recipe_yaml=recipe_yaml,
                      callbacks=callbacks_from_recipe(recipe.eval, recipe.train.seed, recipe_yaml))
    return trainer.train(resume=run.resume)


if __name__ == "__main__":
    main()
