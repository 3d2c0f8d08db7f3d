"""The sentence-transformers layout of a saved encoder (twotower.common.model.encoder.Encoder.save): each tower a
transformers folder plus `modules.json`, pooling, normalisation and prompts; separate towers
behind a sentence-transformers Router, so `SentenceTransformer(path).encode_query` runs the
query tower and `encode_document` the document tower."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from twotower.common.recipe.args import ModelArgs

DOC_TOWER_DIR = "doc_tower"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_ROUTER = "sentence_transformers.models.Router"


def save_router(path: Path) -> None:
    """Make the top module of `path` a sentence-transformers Router (sentence-transformers >= 5):
    route "query" to the Transformer of the folder itself, "document" to doc_tower/'s, then the
    folder's pooling (and normalisation) for both."""
    modules = json.loads((path / "modules.json").read_text())
    modules[0] = {"idx": 0, "name": "0", "path": "", "type": ST_ROUTER}
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "router_config.json").write_text(json.dumps({
        "types": {".": ST_TRANSFORMER, DOC_TOWER_DIR: ST_TRANSFORMER},
        "structure": {"query": ["."], "document": [DOC_TOWER_DIR]},
        # a plain encode() (no task) stays the query tower, as with a shared tower
        "parameters": {"default_route": "query", "allow_empty_key": True, "route_mappings": {}},
    }, indent=2))


def save_tower(model: nn.Module, tokenizer, args: ModelArgs, path: Path, prompts: dict,
                max_seq_length: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if args.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    hidden = int(model.config.hidden_size)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": args.pooling == "cls",
        "pooling_mode_mean_tokens": args.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length or args.max_doc_length, "do_lower_case": False},
        indent=2))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {k: v for k, v in prompts.items() if v},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if args.normalize else "dot",
    }, indent=2))
