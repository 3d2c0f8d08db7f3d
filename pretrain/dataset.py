"""From a recipe to (pair dataset, collate function): corpora → tokens → crops, ICT or title pairs."""
from __future__ import annotations

import contextlib
from typing import Sequence

import datasets
import torch.distributed as dist

from twotower.common.model.distributed import is_distributed, is_main
from twotower.pretrain.args import PretrainRecipe
from twotower.pretrain.chunks import Chunker, DocumentChunker, load_corpora, token_documents
from twotower.pretrain.ict import ict_passages
from twotower.pretrain.pairs import CropPairs, ICTPairs, PairCollator
from twotower.pretrain.titles import TitlePairs, title_pairs


def model_positions(encoder) -> int:
    """How many tokens the encoder takes (position embeddings, or the tokenizer's limit)."""
    config = getattr(encoder.query_model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or encoder.tokenizer.model_max_length
    return int(min(limit, encoder.tokenizer.model_max_length))


def pairs_from_corpora(corpora: Sequence[datasets.Dataset], recipe: PretrainRecipe, encoder):
    """The pair dataset of `recipe.pairs` over already loaded corpora, and its collator."""
    p, d, tok = recipe.pairs, recipe.data, encoder.tokenizer
    if p.task == "crop":
        stream, lengths = token_documents(corpora, tok, d.cache_dir, d.tokenize_batch_size)
        chunker = (DocumentChunker(stream, lengths, p.chunk_length) if p.chunking == "document"
                   else Chunker(stream, p.chunk_length, recipe.train.seed))
        dataset = CropPairs(chunker, p, tok, recipe.train.seed,
                            max_length=model_positions(encoder))
    elif p.task == "title":
        limit = model_positions(encoder)
        dataset = TitlePairs(title_pairs(corpora, tok, d.cache_dir, d.tokenize_batch_size), p, tok,
                             recipe.train.seed,
                             max_query_length=min(recipe.model.max_query_length, limit),
                             max_doc_length=min(recipe.model.max_doc_length, limit))
    else:
        passages = ict_passages(corpora, tok, p.chunk_length, p.punkt, p.punkt_train_chars,
                                d.cache_dir, d.tokenize_batch_size)
        limit = model_positions(encoder)
        dataset = ICTPairs(passages, p, tok, recipe.train.seed,
                           max_query_length=min(recipe.model.max_query_length, limit),
                           max_doc_length=min(recipe.model.max_doc_length, limit))
    return dataset, PairCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first and fills the caches (corpus Arrow tables, the
    tokenising `datasets.map`s, Punkt); the other processes run it after, reading those caches
    instead of tokenising the same corpora into the same cache at once. No-op on one process."""
    several = is_distributed()
    if several and not is_main():
        dist.barrier()
    try:
        yield
    finally:  # also when the main process fails: the others go on (and fail themselves)
        if several and is_main():
            dist.barrier()


def build_pair_dataset(recipe: PretrainRecipe, encoder, report=None):
    """`report` (twotower.common.data.SkipReport) counts the corpus lines skipped with data.on_error=skip.
    With several processes the main one reads and tokenises first (main_process_first)."""
    with main_process_first():
        corpora = load_corpora(recipe.data.corpora, recipe.data.max_docs_per_corpus,
                               recipe.data.on_error, report)
        return pairs_from_corpora(corpora, recipe, encoder)
