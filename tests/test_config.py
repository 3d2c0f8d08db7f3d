"""Recipes: YAML into typed dataclasses, `base:` inheritance, dotted overrides, clear errors."""
from dataclasses import dataclass, field

import pytest

from twotower.common.recipe.args import EvalArgs, ModelArgs, TrainArgs
from twotower.common.recipe.config import RecipeError, load_recipe, save_recipe
from twotower.common.train.cli import parse_run_args


@dataclass
class Loss:
    temperature: float = 0.05
    weights: list = field(default_factory=lambda: [1.0])


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    loss: Loss = field(default_factory=Loss)


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOTOWER_RECIPES", str(tmp_path))
    (tmp_path / "paper.yaml").write_text(
        "train:\n  lr: 5.0e-5\n  max_steps: 500000\n  warmup_steps: 20000\n"
        "loss:\n  temperature: 0.05\n")
    (tmp_path / "paper_cpu.yaml").write_text("base: paper\ntrain:\n  max_steps: 20\n")
    return tmp_path


def test_base_chain_and_overrides(recipes):
    r = load_recipe(Recipe, "paper_cpu", ["train.lr=3e-5", "loss.temperature=0.1"])
    assert isinstance(r, Recipe) and isinstance(r.train, TrainArgs)
    assert (r.train.max_steps, r.train.warmup_steps, r.train.lr) == (20, 20000, 3e-5)
    assert r.loss.temperature == 0.1


def test_path_to_recipe_file(recipes):
    r = load_recipe(Recipe, str(recipes / "paper.yaml"))
    assert r.train.max_steps == 500000


def test_unknown_key_in_file_names_file_key_and_closest(recipes):
    (recipes / "typo.yaml").write_text("train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(Recipe, "typo")
    msg = str(err.value)
    assert "typo.yaml" in msg and "unknown key 'train.learning_rate'" in msg
    assert "valid keys here:" in msg and "train.lr," in msg


def test_unknown_override_suggests_closest_key(recipes):
    with pytest.raises(RecipeError, match=r"unknown key 'train.max_step'; did you mean 'train.max_steps'"):
        load_recipe(Recipe, "paper", ["train.max_step=3"])
    with pytest.raises(RecipeError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_recipe(Recipe, "paper", ["trian.lr=3"])


def test_empty_override_is_the_empty_string(recipes):
    r = load_recipe(Recipe, "paper", ["eval.data=", "model.query_prefix="])
    assert r.eval.data == "" and r.model.query_prefix == ""


def test_text_fields_take_overrides_as_typed(recipes):
    """YAML would read `no` as False and OmegaConf would store "False"; a text field keeps the text."""
    r = load_recipe(Recipe, "paper", ["train.mixed_precision=no", "model.query_prefix=query: ",
                                      "model.doc_prefix='1e-5'"])
    assert (r.train.mixed_precision, r.model.query_prefix, r.model.doc_prefix) == ("no", "query: ", "1e-5")
    (recipes / "unquoted.yaml").write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(RecipeError, match='train.mixed_precision.*got .False. .*write "no"'):
        load_recipe(Recipe, "unquoted")


def test_wrong_type_names_the_key(recipes):
    with pytest.raises(RecipeError, match=r"train.max_steps"):
        load_recipe(Recipe, "paper", ["train.max_steps=many"])
    (recipes / "bad.yaml").write_text("loss:\n  temperature: warm\n")
    with pytest.raises(RecipeError, match=r"bad.yaml.*loss.temperature"):
        load_recipe(Recipe, "bad")


def test_invalid_choice_and_missing_recipe(recipes):
    with pytest.raises(RecipeError, match="train.scheduler"):
        load_recipe(Recipe, "paper", ["train.scheduler=exponential"])
    with pytest.raises(RecipeError, match="Did you mean 'paper'"):
        load_recipe(Recipe, "papr")


def test_circular_base_is_reported(recipes):
    (recipes / "a.yaml").write_text("base: b\n")
    (recipes / "b.yaml").write_text("base: a\n")
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(Recipe, "a")


def test_saved_recipe_loads_back_identically(recipes, tmp_path):
    r = load_recipe(Recipe, "paper_cpu", ["model.config_overrides.num_hidden_layers=2"])
    path = save_recipe(r, tmp_path / "out" / "recipe.yaml")
    assert load_recipe(Recipe, str(path)) == r


def test_cli_rejects_unknown_flags_and_bare_words():
    with pytest.raises(SystemExit):
        parse_run_args("x", ["--recipe", "a", "--lr", "3"])
    with pytest.raises(SystemExit):
        parse_run_args("x", ["--recipe", "a", "train.lr"])
    run = parse_run_args("x", ["--recipe", "a", "--resume", "train.lr=3"])
    assert (run.recipe, run.resume, run.overrides) == ("a", True, ["train.lr=3"])
