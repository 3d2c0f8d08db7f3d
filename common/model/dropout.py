"""`model.attention_dropout` and `model.hidden_dropout`: one recipe key each, whatever a model
family's config calls the field, overriding the checkpoint's value for training only.

Why a recipe choice: on CPUs, attention dropout is most of a training step. With it on, PyTorch's
scaled-dot-product attention cannot use its fused CPU kernel; it materialises every attention
matrix and draws a random mask for it, forward and backward (issue #24's table: the same bare
all-MiniLM-L6-v2 step at bf16 runs 4.15 pairs/s with BERT's 0.1 / 0.1, 8.91 with attention
dropout 0, 12.49 with none). On GPUs the fused kernels apply dropout inside, so there it is cheap.

The saved model keeps the checkpoint's own values (`restored`): dropout is how this run trained,
not a property of the model, and a later stage or user loading it gets the family's default.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

from twotower.common.recipe.args import ModelArgs
from twotower.common.recipe.config import RecipeError

# config fields by kind, over the encoder families transformers ships: BERT, RoBERTa, XLM-R,
# MPNet, ELECTRA (attention_probs_dropout_prob / hidden_dropout_prob), DistilBERT
# (attention_dropout / dropout), ModernBERT (attention_dropout / embedding_dropout, mlp_dropout).
# Every field of a kind that a config has is set. Classifier dropouts are left alone (unused).
FIELDS = {"attention": ("attention_probs_dropout_prob", "attention_dropout"),
          "hidden": ("hidden_dropout_prob", "dropout", "embedding_dropout", "mlp_dropout")}


def dropout_fields(config, args: ModelArgs) -> dict[str, float]:
    """The config fields and values that args.attention_dropout / hidden_dropout set (None:
    the checkpoint's own). A value for a config with no such field is refused, naming the fields
    looked for: a setting that silently changed nothing would mislead a speed or quality claim."""
    fields = {}
    for kind, value in (("attention", args.attention_dropout), ("hidden", args.hidden_dropout)):
        if value is None:
            continue
        found = [name for name in FIELDS[kind]
                 if type(getattr(config, name, None)) in (int, float)]  # None: not this family's
        if not found:
            raise RecipeError(
                f"'model.{kind}_dropout' is set, but the config of {args.name_or_path} "
                f"({getattr(config, 'model_type', '?')}) has none of the fields {list(FIELDS[kind])}; "
                f"set its own field with model.config_overrides")
        fields.update({name: float(value) for name in found})
    return fields


@contextlib.contextmanager
def restored(towers: Iterable, values: dict[str, float]):
    """The towers' configs with the checkpoint's dropout `values` while the block runs (a save);
    the built modules keep the rate they were built with, so training is not affected."""
    configs = [tower.config for tower in towers]
    current = [{name: getattr(config, name) for name in values} for config in configs]
    try:
        for config in configs:
            for name, value in values.items():
                setattr(config, name, value)
        yield
    finally:
        for config, before in zip(configs, current):
            for name, value in before.items():
                setattr(config, name, value)
