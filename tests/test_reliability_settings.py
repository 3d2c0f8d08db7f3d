"""Every numeric setting checked when the recipe loads, naming its key (before: accepted, or a
ZeroDivisionError / a torch error at step 1 or 2); lengths against the model's position
embeddings as soon as its config is known; `train.global_batch_size`, the papers' number, met
exactly on any number of processes or refused."""
import pytest

from tests.test_training import assert_same_weights, run_toy
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.args import TrainArgs
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.common.train.epochs import resolve_batch
from twotower.finetune.args import FinetuneRecipe
from twotower.pretrain.args import PretrainRecipe

BAD = [("train.gradient_accumulation_steps", 0), ("train.gradient_accumulation_steps", -2),
       ("train.warmup_steps", -5), ("train.save_every", -1), ("train.keep_last", 0),
       ("train.log_every", 0), ("train.per_device_batch_size", 0),
       ("train.per_device_batch_size", -4), ("train.lr", -1e-5), ("train.lr", 0),
       ("train.adam_beta2", 1.5), ("train.adam_eps", 0), ("train.max_grad_norm", -1),
       ("train.eval_every", -3), ("train.num_workers", -1), ("train.global_batch_size", -8),
       ("model.max_doc_length", 0), ("model.max_query_length", -1), ("model.forward_chunk", -2),
       ("eval.batch_size", 0), ("eval.max_queries", -1)]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_a_bad_setting_is_refused_at_load_naming_its_key(key, value):
    with pytest.raises(RecipeError, match=f"'{key}' must be"):
        load_recipe(FinetuneRecipe, "fewshot_cpu", [f"{key}={value}"])


def test_lengths_are_checked_against_the_models_positions():
    with pytest.raises(RecipeError, match=r"'model.max_doc_length' is 1000, .* takes 1 to 512"):
        tiny_bert(max_doc_length=1000)
    assert tiny_bert(max_doc_length=512).args.max_doc_length == 512


def test_a_length_over_the_model_fails_before_the_run_folder_exists(tmp_path):
    """Before: the run started, wrote recipe.yaml / run_info.json / logs, and died at step 2."""
    out = tmp_path / "run"
    proc = run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8",
                   "model.max_doc_length=1000", check=False)
    assert proc.returncode != 0 and "'model.max_doc_length' is 1000" in proc.stderr
    assert not out.exists()


def test_global_batch_is_split_exactly_or_refused():
    args = TrainArgs(global_batch_size=2048, per_device_batch_size=64)
    assert [resolve_batch(args, n).per_device_batch_size for n in (1, 8, 32)] == [2048, 256, 64]
    with pytest.raises(RecipeError, match="cannot be split evenly over 3 processes"):
        resolve_batch(args, 3)
    assert resolve_batch(TrainArgs(per_device_batch_size=8), 4).per_device_batch_size == 8
    with pytest.raises(RecipeError, match="gradient_accumulation_steps' must be 1"):
        load_recipe(PretrainRecipe, "contriever", ["train.gradient_accumulation_steps=2"])


def test_the_paper_recipes_state_the_global_batch():
    for name in ("contriever", "contriever_inbatch", "recontriever", "ict"):
        assert load_recipe(PretrainRecipe, name).train.global_batch_size == 2048
    for name in ("msmarco_mnrl", "msmarco_margin_mse", "pair_two_stage"):
        assert load_recipe(FinetuneRecipe, name).train.global_batch_size == 64
    assert load_recipe(FinetuneRecipe, "gpl").train.global_batch_size == 32


def test_a_per_device_batch_that_the_global_batch_replaces_is_refused():
    with pytest.raises(RecipeError, match=r"override 'train.per_device_batch_size=4': "
                       r"'train.per_device_batch_size' has no effect while "
                       r"'train.global_batch_size' is 2048 \(set in .*contriever.yaml\)"):
        load_recipe(PretrainRecipe, "recontriever", ["train.per_device_batch_size=4"])
    ok = load_recipe(PretrainRecipe, "recontriever", ["train.global_batch_size=0",
                                                      "train.per_device_batch_size=4"])
    assert ok.train.per_device_batch_size == 4
    # the CPU companions set their own per-device batch after their paper recipe's global one
    assert load_recipe(PretrainRecipe, "recontriever_cpu").train.global_batch_size == 0


def test_two_processes_and_one_meet_the_same_global_batch(tmp_path):
    """The same recipe (global 16) on 1 and on 2 processes: 16 per device, then 8 per device with
    the in-batch negatives gathered -- the same training."""
    run_toy(tmp_path / "one", "train.max_steps=3", "train.global_batch_size=16")
    run_toy(tmp_path / "two", "train.max_steps=3", "train.global_batch_size=16", processes=2)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=2e-5)
    proc = run_toy(tmp_path / "three", "train.max_steps=3", "train.global_batch_size=15",
                   processes=2, check=False)
    assert proc.returncode != 0 and "cannot be split evenly over 2 processes" in proc.stderr


def test_fp16_on_the_cpu_is_refused_not_run_in_fp32(tmp_path):
    """Accelerate makes no GradScaler and no autocast for fp16 on a CPU: the GPU recipes' fp16
    would silently train fp32 there. (fp16 itself, with its scaler checkpointed and resumed, is
    run on a GPU: docs/results.md, 'fp16 on CUDA'.)"""
    proc = run_toy(tmp_path / "run", "train.max_steps=1", "train.per_device_batch_size=8",
                   "train.mixed_precision=fp16", check=False)
    assert proc.returncode != 0 and "train.mixed_precision=fp16 needs a GPU" in proc.stderr
