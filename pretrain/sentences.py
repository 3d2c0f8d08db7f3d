"""Sentence splitting for the inverse cloze task: nltk Punkt, offline.

nltk's pretrained English Punkt model (`punkt_tab`) is a separate download. This module never
downloads: with `punkt="auto"` it uses the installed model when `nltk.data.find` sees it, and
otherwise trains an unsupervised `PunktSentenceTokenizer` on the corpus itself (Punkt is an
unsupervised algorithm, Kiss & Strunk 2006), logging a warning that says so.
`punkt="pretrained"` fails with instructions instead of training; `punkt="train"` always trains.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

log = logging.getLogger("twotower.pretrain")
PUNKT_RESOURCES = ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle")


def pretrained_punkt_available() -> bool:
    import nltk

    for resource in PUNKT_RESOURCES:
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def resolved_mode(mode: str, key: str = "pairs.punkt") -> str:
    """'pretrained' or 'trained': what `load_splitter(mode, ...)` will use (in cache keys).
    `key`: the recipe key that set `mode`, named in messages."""
    if mode not in ("auto", "pretrained", "train"):
        raise ValueError(f"{key} must be auto, pretrained or train; got {mode!r}")
    if mode == "train":
        return "trained"
    if pretrained_punkt_available():
        return "pretrained"
    if mode == "pretrained":
        raise LookupError(
            f"{key}=pretrained but nltk's Punkt data is not installed (looked for "
            f"{', '.join(PUNKT_RESOURCES)} in nltk.data.path). Install it where there is a network "
            f"(python -m nltk.downloader punkt_tab) or set {key}=auto to train Punkt on the "
            "corpus offline.")
    return "trained"


def train_punkt(texts: Iterable[str], max_chars: int):
    """An unsupervised Punkt model trained on the first `max_chars` characters of `texts`."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    parts, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        text = text[: max_chars - total]
        parts.append(text)
        total += len(text) + 2
    if not parts:
        raise ValueError("cannot train Punkt: the corpus has no text")
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train("\n\n".join(parts), finalize=True)
    return PunktSentenceTokenizer(trainer.get_params()), total


def load_splitter(mode: str, texts: Callable[[], Iterable[str]],
                  max_train_chars: int = 2_000_000,
                  key: str = "pairs.punkt") -> Callable[[str], list[str]]:
    """A function text -> sentences. `texts()` is called only when Punkt must be trained."""
    if resolved_mode(mode, key) == "pretrained":
        from nltk.tokenize import PunktTokenizer

        tokenizer = PunktTokenizer("english")
        log.info("sentence splitting with nltk's pretrained English Punkt model")
        return tokenizer.tokenize
    tokenizer, used = train_punkt(texts(), max_train_chars)
    log.warning("nltk's pretrained Punkt data is not installed (no download is attempted): "
                "trained an unsupervised Punkt sentence splitter on %d characters of the corpus "
                "itself (%s=%s)", used, key, mode)
    return tokenizer.tokenize
