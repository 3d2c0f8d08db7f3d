"""A model card for every model a run saves: `<output_dir>/model/README.md` in the Hugging Face
format (YAML metadata: base model, library, tags, datasets, model-index with the run's final
evaluation), then what produced it: the command, the recipe, the data, the evaluation table, and
how to load it. Written by the ModelCard callback after the model (twotower.common.train)."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from twotower.common.train.callbacks import TrainerCallback, TrainPoint
from twotower.common.train.rundir import write_atomic

# bundled:<name> is the offline copy of the hub model sentence-transformers/<name>
BUNDLED_PREFIX = "bundled:"
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval",
        "twotower"]


def command_of(stage: str, recipe: str | None, overrides: list[str]) -> str:
    """The command that reproduces a run of `twotower <stage>` (the same under accelerate)."""
    return shlex.join(["twotower", stage, *(["--recipe", recipe] if recipe else []), *overrides])


@dataclass
class CardFacts:
    recipe_name: str
    recipe_yaml: str
    base_model: str  # model.name_or_path
    datasets: list[str] = field(default_factory=list)  # what it was trained on
    eval_data: str = ""  # eval.data
    eval_split: str = ""
    command: str = ""  # what reproduces the run ("" = this process's command line)


def hub_id(name_or_path: str) -> str | None:
    """The hub id of a base model, None for a local folder (no hub id to link)."""
    if name_or_path.startswith(BUNDLED_PREFIX):
        return "sentence-transformers/" + name_or_path[len(BUNDLED_PREFIX):]
    if Path(name_or_path).exists() or name_or_path.startswith(("/", ".")):
        return None
    return name_or_path


def metadata(facts: CardFacts, metrics: dict[str, float]) -> dict:
    meta: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                  "tags": TAGS}
    base = hub_id(facts.base_model)
    if base:
        meta["base_model"] = base
    if facts.datasets:
        meta["datasets"] = [Path(d).name if Path(d).exists() else d for d in facts.datasets]
    if metrics and facts.eval_data:
        meta["model-index"] = [{"name": f"twotower-{facts.recipe_name}", "results": [{
            "task": {"type": "retrieval"},
            "dataset": {"name": Path(facts.eval_data).name, "type": Path(facts.eval_data).name,
                        "split": facts.eval_split},
            "metrics": [{"type": name, "value": round(float(value), 4)}
                        for name, value in metrics.items()]}]}]
    return meta


def render(facts: CardFacts, metrics: dict[str, float], step: int, command: str) -> str:
    meta = OmegaConf.to_yaml(OmegaConf.create(metadata(facts, metrics))).rstrip()
    lines = ["---", meta, "---", "",
             f"# twotower-{facts.recipe_name}", "",
             f"A dense retriever trained with the twotower recipe "
             f"`{facts.recipe_name}` from `{facts.base_model}` for {step} steps"
             + (f" on {', '.join(f'`{d}`' for d in facts.datasets)}." if facts.datasets else "."),
             "", "## Use", "", "```python",
             "from sentence_transformers import SentenceTransformer",
             "model = SentenceTransformer(\"path/to/this/folder\")",
             "```", ""]
    if metrics:
        lines += [f"## Evaluation ({Path(facts.eval_data).name}, {facts.eval_split}, step {step})",
                  "", "| measure | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
        lines.append("")
    lines += ["## Reproduce", "", "```bash", command, "```", "", "## Recipe", "", "```yaml",
              facts.recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


class ModelCard(TrainerCallback):
    """Writes model/README.md once the run's model and final metrics exist (main process)."""

    def __init__(self, facts: CardFacts):
        self.facts = facts

    def on_train_end(self, point: TrainPoint, metrics: dict[str, float]) -> None:
        write_atomic(point.output_dir / "model" / "README.md", render(
            self.facts, metrics, point.step, self.facts.command or " ".join(sys.argv)))
