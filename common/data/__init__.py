"""Data readers: BEIR folders, generic JSONL/TSV corpora, MS MARCO files, qrels and TREC runs.

Every reader error is a :class:`DataError` (``ValueError``) naming the file and line.  Readers
take ``on_error="raise"`` (default) or ``"skip"``; skipped lines are counted per file and reason
in a :class:`SkipReport` (pass ``report=`` to collect them) and logged as a warning.
Names resolve through :func:`resolve_data`: an existing path, ``$TWOTOWER_DATA/<name>``, then a
download (BEIR zip, or ``hf:owner/repo``) into ``$TWOTOWER_CACHE``.
"""

from .beir import RetrievalData, beir_splits, load_beir
from .corpus import column, load_corpus, load_queries
from .errors import BadLinePolicy, DataError, DataNotFoundError, SkipReport
from .msmarco import (hard_negative_pairs, load_hard_negatives, load_msmarco_collection,
                      load_msmarco_queries, load_triples)
from .resolve import BEIR_DATASETS, resolve_data
from .scores import TeacherScores, check_teacher_scores, load_teacher_scores
from .trec import load_qrels, load_run, ranked_ids, write_run

__all__ = [
    "BEIR_DATASETS", "BadLinePolicy", "DataError", "DataNotFoundError", "RetrievalData",
    "SkipReport", "TeacherScores", "beir_splits", "check_teacher_scores", "column",
    "hard_negative_pairs", "load_beir", "load_corpus", "load_hard_negatives",
    "load_msmarco_collection", "load_msmarco_queries", "load_qrels", "load_run",
    "load_teacher_scores", "load_triples", "load_queries", "ranked_ids", "resolve_data",
    "write_run",
]
