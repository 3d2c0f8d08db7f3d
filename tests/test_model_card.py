"""Every saved model gets a Hugging Face model card (common/report/model_card.py): metadata the hub
library parses (base model, datasets, model-index with the final metrics), the command, the
recipe, and sentence-transformers still loads the folder."""
from __future__ import annotations

from huggingface_hub import ModelCard as HubCard
from sentence_transformers import SentenceTransformer

from tests.test_trainer_callbacks import LOSS, Pairs, Recorder
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.args import TrainArgs
from twotower.common.report.model_card import CardFacts, ModelCard, command_of, hub_id
from twotower.common.train.trainer import Trainer
from twotower.finetune.data import GroupCollator
from twotower.finetune.method import FinetuneMethod

RECIPE = "model:\n  name_or_path: bundled:all-MiniLM-L6-v2\ntrain:\n  max_steps: 2\n"


def test_the_saved_model_has_a_card_the_hub_library_reads(tmp_path):
    encoder = tiny_bert(normalize=True)
    args = TrainArgs(output_dir=str(tmp_path / "run"), max_steps=2, per_device_batch_size=4,
                     device="cpu", warmup_steps=0)
    facts = CardFacts("fewshot", RECIPE, "bundled:all-MiniLM-L6-v2", ["scifact"], "scifact",
                      "test", command_of("finetune", "fewshot", ["train.lr=1e-5"]))
    recorder = Recorder()  # returns {"my_metric": step}: the final metrics reach the card
    Trainer(args, FinetuneMethod(encoder, LOSS), Pairs(), GroupCollator(encoder.tokenize),
            recipe_yaml=RECIPE, callbacks=[recorder, ModelCard(facts)]).train()
    path = tmp_path / "run" / "model" / "README.md"
    card = HubCard.load(path)
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.library_name == "sentence-transformers"
    assert card.data.datasets == ["scifact"] and "twotower" in card.data.tags
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.dataset_split) == ("scifact", "test")
    assert (result.metric_type, result.metric_value) == ("my_metric", 2.0)
    text = path.read_text()
    assert "twotower finetune --recipe fewshot train.lr=1e-5" in text and RECIPE.strip() in text
    assert "| my_metric | 2.0000 |" in text
    # the folder is still a sentence-transformers model
    SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu").encode(["a query"])


def test_hub_ids_of_base_models(tmp_path):
    assert hub_id("bundled:all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_id(str(tmp_path)) is None  # a local folder links to nothing
