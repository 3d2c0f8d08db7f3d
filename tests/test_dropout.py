"""model.attention_dropout / model.hidden_dropout (common/model/dropout.py): the rates the built
modules train with, per model family; the saved model keeps the checkpoint's values; a setting
that would change nothing is refused."""
import json

import pytest
import torch
from transformers import DistilBertConfig, T5Config

from twotower.common.model.dropout import dropout_fields
from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.recipe.args import ModelArgs
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_bert(dropout=0.1).save(path)
    return path


def rates(encoder) -> dict:
    """Dropout rate of the attention-probability modules and of all the others."""
    found = {"attention": set(), "hidden": set()}
    for name, module in encoder.query_model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            kind = "attention" if name.endswith("attention.self.dropout") else "hidden"
            found[kind].add(module.p)
    return found


def load(path, **dropout) -> Encoder:
    return Encoder.load(ModelArgs(name_or_path=str(path), tokenizer="bundled:all-MiniLM-L6-v2",
                                  **dropout))


def twice(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    encoder.train()
    batch = encoder.tokenize(["dropout changes a training forward", "and this one"], tower="doc")
    with torch.no_grad():
        return encoder(**batch, tower="doc"), encoder(**batch, tower="doc")


def test_checkpoint_rates_by_default_and_each_key_sets_its_kind(checkpoint):
    assert rates(load(checkpoint)) == {"attention": {0.1}, "hidden": {0.1}}
    assert rates(load(checkpoint, attention_dropout=0.0)) == {"attention": {0.0}, "hidden": {0.1}}
    assert rates(load(checkpoint, hidden_dropout=0.0)) == {"attention": {0.1}, "hidden": {0.0}}
    assert rates(load(checkpoint, attention_dropout=0.0, hidden_dropout=0.25)) == {
        "attention": {0.0}, "hidden": {0.25}}


def test_no_dropout_makes_training_forwards_deterministic(checkpoint):
    first, second = twice(load(checkpoint))
    assert not torch.allclose(first, second)  # dropout on: two draws differ
    first, second = twice(load(checkpoint, attention_dropout=0.0, hidden_dropout=0.0))
    assert torch.equal(first, second)


def test_saved_model_keeps_the_checkpoints_rates(checkpoint, tmp_path):
    trained = load(checkpoint, attention_dropout=0.0, hidden_dropout=0.0)
    trained.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["attention_probs_dropout_prob"], config["hidden_dropout_prob"]) == (0.1, 0.1)
    assert rates(trained) == {"attention": {0.0}, "hidden": {0.0}}  # the run itself unchanged
    assert trained.query_model.config.attention_probs_dropout_prob == 0.0
    assert rates(load(tmp_path / "out")) == {"attention": {0.1}, "hidden": {0.1}}


def test_field_names_per_family():
    args = ModelArgs(attention_dropout=0.0, hidden_dropout=0.05)
    assert dropout_fields(DistilBertConfig(), args) == {"attention_dropout": 0.0, "dropout": 0.05}
    assert dropout_fields(DistilBertConfig(), ModelArgs()) == {}
    with pytest.raises(RecipeError, match=r"model.attention_dropout.*t5.*attention_probs_dropout"):
        dropout_fields(T5Config(), ModelArgs(attention_dropout=0.0))


def test_recipe_keys_are_parsed_and_checked():
    recipe = load_recipe(FinetuneRecipe, "fewshot_cpu", ["model.attention_dropout=0",
                                                          "model.hidden_dropout=null"])
    assert recipe.model.attention_dropout == 0.0 and recipe.model.hidden_dropout is None
    with pytest.raises(RecipeError, match=r"model.hidden_dropout.*1.5"):
        load_recipe(FinetuneRecipe, "fewshot_cpu", ["model.hidden_dropout=1.5"])
