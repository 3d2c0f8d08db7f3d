"""Open-domain QA retrieval evaluation: top-k answer accuracy, the protocol of the QA tables of
DPR (Karpukhin et al. 2020, "Dense Passage Retrieval for Open-Domain Question Answering", §5.1
and Table 2: "top-k accuracy", the fraction of questions for which one of the top k retrieved
passages contains a span that answers the question), and the NQ/TriviaQA tables of Contriever
(Izacard et al. 2022) and ReContriever, which reuse DPR's matching code.

Answer matching follows facebookresearch/DPR ``dpr/data/qa_validation.py`` (``has_answer``,
``_normalize``) with ``dpr/utils/tokenizers.py`` (``SimpleTokenizer``), the same code Contriever
runs through FiD's ``src/evaluation.py``:

* "string" (NQ, TriviaQA, WebQuestions, ...): passage and answer are Unicode-NFD normalised,
  tokenised with the regex ``[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]`` (runs of letters, numbers and
  combining marks, or any other single non-separator non-control character), each token
  lower-cased; a passage has the answer when the answer's tokens occur as a contiguous run of its
  tokens. NFD does not strip accents: "Café" becomes "Cafe" + U+0301, one token "cafe\\u0301",
  so it matches "CAFÉ" (in NFC or NFD) but not "cafe";
* "regex" (CuratedTREC, whose answers are patterns): the NFD pattern is searched in the NFD
  passage with the ``regex`` package and flags IGNORECASE | UNICODE | MULTILINE.

Only the passage *text* is searched, not its title (DPR's ``check_answer`` reads ``doc[0]``, the
text; FiD/Contriever read ``doc['text']``); retrieval encodes title + " " + text as for BEIR.
Where the references differ or are loose (see also common/data/qa.py):
* questions are encoded as given. DPR's retriever drops one trailing "?" first
  (``dpr/utils/data_utils.py: normalize_question``); Contriever's passage_retrieval does not;
* an answer without tokens matches every passage in DPR (the empty list equals the empty slice);
  the loaders refuse such answers and here they match nothing;
* regex mode: a pattern that does not compile silently matches nothing in DPR; same here, but
  counted (``invalid_answer_patterns`` in metrics.json) and logged. Only the pattern's literal
  characters are NFD-normalised, an escape such as ``\u00e9`` still means the composed "é" and
  misses NFD text (true of DPR too);
* a question with fewer than k retrieved passages (BM25 returns no zero-score passage) has
  "no answer" in the missing ranks, as in DPR where all runs have the same depth.
Library: evaluate_qa_dense(encoder, passages, questions, args), evaluate_qa_bm25(...)
-> QAResult; write_qa_outputs(result, dir). CLI: common/eval/cli.py (--qa-passages ...).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import regex

from twotower.common.data import DataError, column, ranked_ids, resolve_data, write_run
from twotower.common.data.qa import QAQuestion, load_dpr_passages, load_qa_questions
from twotower.common.eval.bm25 import BM25Args, BM25Index
from twotower.common.eval.evaluate import _encode, _encoder_info
from twotower.common.eval.search import dense_search
from twotower.common.eval.sharded import process_device
from twotower.common.model.distributed import is_main
from twotower.common.model.encoder import Encoder

logger = logging.getLogger("twotower.common.eval.qa")
Run = Dict[str, Dict[str, float]]
MATCH_TYPES = ("string", "regex")
DEFAULT_KS = (5, 20, 100)
QA_OUTPUTS = {"metrics": "metrics.json", "run": "run.trec", "questions": "per_question.jsonl"}
# DPR compiles its token pattern as "(ALPHA_NUM)|(NON_WS)" with these flags; the groups and
# IGNORECASE change nothing about which spans match, they are kept to stay literal
_DPR_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
_TOKEN_RE = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=_DPR_FLAGS)


@dataclass
class QAArgs:
    ks: Sequence[int] = DEFAULT_KS  # accuracy cut-offs; retrieval depth = max(ks)
    match: str = "string"  # "string" (DPR default) | "regex" (CuratedTREC)

    def __post_init__(self):
        if self.match not in MATCH_TYPES:
            raise ValueError(f"match must be one of {MATCH_TYPES}, got {self.match!r}")
        if not self.ks or any(int(k) != k or k <= 0 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {list(self.ks)}")
        self.ks = tuple(sorted(set(int(k) for k in self.ks)))

    @property
    def depth(self) -> int:
        return max(self.ks)


@dataclass
class QAResult:
    metrics: Dict[str, float]  # "Acc@k" -> fraction of questions
    run: Run
    first_hit: List[Optional[int]]  # per question: 1-based rank of the first answer passage
    questions: List[QAQuestion]
    info: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ answer matching
def dpr_tokens(text: str) -> List[str]:
    """DPR's SimpleTokenizer words, uncased, of the NFD-normalised text (normalise, tokenise,
    then lower-case each token: DPR's order)."""
    return [m.group().lower() for m in _TOKEN_RE.finditer(unicodedata.normalize("NFD", text))]


def _contains(tokens: Sequence[str], answer: tuple) -> bool:
    n = len(answer)
    return any(tokens[i] == answer[0] and tuple(tokens[i:i + n]) == answer
               for i in range(len(tokens) - n + 1))


class AnswerMatcher:
    """`matcher(passage_text) -> bool` for one question's answers; the answers are tokenised
    (or compiled) once, not once per passage as DPR's has_answer does."""

    def __init__(self, answers: Sequence[str], match: str = "string"):
        if match not in MATCH_TYPES:
            raise ValueError(f"match must be one of {MATCH_TYPES}, got {match!r}")
        self.match = match
        self.invalid_patterns: List[str] = []
        if match == "string":
            # An answer without tokens would match every passage in DPR ([] equals the empty
            # slice at i = 0); the loaders refuse such answers, and here they never match.
            self.answers = [tuple(t) for t in map(dpr_tokens, answers) if t]
        else:
            self.patterns = []
            for answer in answers:
                try:
                    self.patterns.append(regex.compile(unicodedata.normalize("NFD", answer),
                                                       flags=_DPR_FLAGS))
                except regex.error:  # DPR's regex_match returns False for a bad pattern
                    self.invalid_patterns.append(answer)

    def __call__(self, text: str) -> bool:
        if self.match == "string":
            tokens = dpr_tokens(text)
            return any(_contains(tokens, answer) for answer in self.answers)
        text = unicodedata.normalize("NFD", text)  # not lower-cased: the flags ignore case
        return any(p.search(text) is not None for p in self.patterns)


def has_answer(answers: Sequence[str], text: str, match: str = "string") -> bool:
    """DPR's has_answer: does `text` contain one of `answers` (see the module docstring)?"""
    return AnswerMatcher(answers, match)(text)


# ------------------------------------------------------------------------------- scoring
def first_hit_ranks(run: Mapping[str, Mapping[str, float]], questions: Sequence[QAQuestion],
                    text_of: Mapping[str, str], match: str = "string",
                    depth: int | None = None) -> tuple[List[Optional[int]], int]:
    """Per question, the 1-based rank of its first retrieved passage (within `depth`) that has
    an answer, or None; and the number of answer patterns that failed to compile (regex)."""
    ranks: List[Optional[int]] = []
    invalid = 0
    for q in questions:
        matcher = AnswerMatcher(q.answers, match)
        if matcher.invalid_patterns:
            invalid += len(matcher.invalid_patterns)
            logger.warning("question %s: answer pattern(s) %s do not compile; they match nothing "
                           "(as in DPR)", q.id, matcher.invalid_patterns)
        ids = ranked_ids(run.get(q.id, {}))[:depth]
        ranks.append(next((r for r, d in enumerate(ids, 1) if matcher(text_of[d])), None))
    return ranks, invalid


def top_k_accuracy(first_hit: Sequence[Optional[int]], ks: Sequence[int]) -> Dict[str, float]:
    """{"Acc@k": fraction of questions whose first answer passage ranks <= k}."""
    if not first_hit:
        raise ValueError("no questions to score")
    return {f"Acc@{k}": sum(r is not None and r <= k for r in first_hit) / len(first_hit)
            for k in ks}


def _column(passages, name: str) -> list:
    """A column of a datasets.Dataset or of a list of dicts."""
    if hasattr(passages, "select_columns"):
        return column(passages, name)
    return [row.get(name) if name == "title" else row[name] for row in passages]


def _texts_of(passages, needed: set) -> Dict[str, str]:
    """{id: text} of the retrieved passages only (21M psgs_w100 texts would not fit as str)."""
    ids = [str(d) for d in _column(passages, "id")]
    rows = [i for i, d in enumerate(ids) if d in needed]
    if hasattr(passages, "select"):
        return dict(zip((ids[i] for i in rows), column(passages.select(rows), "text")))
    return {ids[i]: passages[i]["text"] for i in rows}


def _finish(run: Run, passages, questions: Sequence[QAQuestion], args: QAArgs, info: dict,
            started: float) -> QAResult:
    t = time.perf_counter()
    text_of = _texts_of(passages, {d for docs in run.values() for d in docs})
    first_hit, invalid = first_hit_ranks(run, questions, text_of, args.match, args.depth)
    timing = info.setdefault("timing", {})
    timing["match_s"] = round(time.perf_counter() - t, 3)
    timing["total_s"] = round(time.perf_counter() - started, 3)
    info.update(mode="qa", match=args.match, ks=list(args.ks), k=args.depth,
                n_questions=len(questions), n_docs=len(passages))
    if args.match == "regex":
        info["invalid_answer_patterns"] = invalid
    return QAResult(top_k_accuracy(first_hit, args.ks), run, first_hit, list(questions), info)


# ------------------------------------------------------------------------------- systems
def evaluate_qa_dense(encoder, passages, questions: Sequence[QAQuestion],
                      args: QAArgs | None = None, batch_size: int = 64, index: str = "flat",
                      search_params: str | None = None, progress: bool = True,
                      shard: bool = False) -> QAResult:
    """Encode passages (title + " " + text) and questions, retrieve the top max(ks) by inner
    product (twotower.common.eval.search), score answers. `passages`: Dataset/rows with id, title, text.
    shard: every process of a multi-process launch encodes a slice of the passages (all
    processes must call this; each gets the full result), as evaluate_dense does."""
    args = args or QAArgs()
    started = time.perf_counter()
    doc_ids = [str(d) for d in _column(passages, "id")]
    rows = [{"title": title or "", "text": text}
            for title, text in zip(_column(passages, "title"), _column(passages, "text"))]
    qids, qtexts = [q.id for q in questions], [q.question for q in questions]
    doc_emb, query_emb, timing = _encode(encoder, rows, qtexts, batch_size, progress,
                                         shard=shard)
    t = time.perf_counter()
    run = dense_search(query_emb, doc_emb, qids, doc_ids, k=args.depth, index=index,
                       similarity=encoder.similarity, search_params=search_params)
    timing["search_s"] = round(time.perf_counter() - t, 3)
    info = {**_encoder_info(encoder), "index": index, "timing": timing}
    return _finish(run, passages, questions, args, info, started)


def evaluate_qa_bm25(passages, questions: Sequence[QAQuestion], args: QAArgs | None = None,
                     bm25_args=None) -> QAResult:
    """BM25 (common/eval/bm25.py, title + " " + text) top max(ks) per question, answers scored."""
    args, bm25_args = args or QAArgs(), bm25_args or BM25Args()
    started = time.perf_counter()
    t = time.perf_counter()
    bm25 = BM25Index(passages, bm25_args)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    run = bm25.search([q.id for q in questions], [q.question for q in questions], args.depth)
    info = {"system": "bm25", "model": "bm25", "bm25": dataclasses.asdict(bm25_args),
            "timing": {"index_s": round(t_index, 3),
                       "search_s": round(time.perf_counter() - t, 3)}}
    return _finish(run, passages, questions, args, info, started)


# ------------------------------------------------------------------------------- outputs
def existing_qa_outputs(output_dir: str | Path) -> List[str]:
    return [name for name in QA_OUTPUTS.values() if (Path(output_dir) / name).exists()]


def write_qa_outputs(result: QAResult, output_dir: str | Path, overwrite: bool = False,
                     extra: Mapping[str, Any] | None = None) -> Dict[str, Path]:
    """metrics.json (accuracies, counts, timing, `extra`), run.trec (depth max(ks)) and
    per_question.jsonl (id, question, answers, first_hit_rank or null); refuses to replace
    existing files unless `overwrite`."""
    output_dir = Path(output_dir)
    found = existing_qa_outputs(output_dir)
    if found and not overwrite:
        raise FileExistsError(f"{output_dir} already has {', '.join(found)}; pass --overwrite "
                              "(overwrite=True) to replace them, or choose another --output-dir")
    clash = set(extra or {}) & (set(result.info) | {"metrics"})
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would replace result fields")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: output_dir / name for key, name in QA_OUTPUTS.items()}
    write_run(result.run, paths["run"], tag="".join(str(result.info.get("model")).split()) or
              "twotower")
    summary = {"metrics": result.metrics, **result.info, **dict(extra or {})}
    paths["metrics"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with paths["questions"].open("w", encoding="utf-8") as f:
        for q, rank in zip(result.questions, result.first_hit):
            f.write(json.dumps({"id": q.id, "question": q.question, "answers": q.answers,
                                "first_hit_rank": rank}, ensure_ascii=False) + "\n")
    return paths


# ----------------------------------------------------------------------------------- CLI
def run_cli(parser, ns, model_slug: str, model_args, command: str, shard: bool = False) -> int:
    """The QA branch of `python -m twotower.common.eval.evaluate` (flags checked by common/eval/cli.py):
    every process of a multi-process launch runs this; the main one writes the outputs."""
    try:
        passages_path, questions_path = map(resolve_data, (ns.qa_passages, ns.qa_questions))
    except DataError as err:
        parser.error(str(err))
    name = questions_path.name.split(".")[0] or "qa"
    output_dir = Path(ns.output_dir or Path("runs", "eval", f"{model_slug}-{name}-qa"))
    found = existing_qa_outputs(output_dir)
    if found and not ns.overwrite:  # refuse before any expensive work
        parser.error(f"{output_dir} already has {', '.join(found)}; pass --overwrite to replace "
                     "them, or choose another --output-dir")
    try:
        passages = load_dpr_passages(passages_path)
        questions = load_qa_questions(questions_path)
    except DataError as err:  # names file and line; a traceback adds nothing
        parser.exit(1, f"error: {err}\n")
    args = QAArgs(ks=ns.qa_k or DEFAULT_KS, match=ns.qa_match or "string")
    if ns.system == "bm25":
        bm25_args = BM25Args(**{f: v for f, v in (("k1", ns.bm25_k1), ("b", ns.bm25_b))
                                if v is not None})
        result = evaluate_qa_bm25(passages, questions, args, bm25_args)
    else:
        encoder = Encoder.load(model_args).to(process_device())
        encoder.encode_bf16, encoder.encode_compile = ns.bf16, ns.compile
        result = evaluate_qa_dense(encoder, passages, questions, args,
                                   batch_size=ns.batch_size, index=ns.index or "flat",
                                   search_params=ns.search_params,
                                   progress=not ns.no_progress, shard=shard)
    if not is_main():  # every process has the result; one writes it
        return 0
    extra = {"passages_path": str(passages_path), "questions_path": str(questions_path),
             "command": command}
    paths = write_qa_outputs(result, output_dir, overwrite=ns.overwrite, extra=extra)
    for metric, value in result.metrics.items():
        print(f"{metric:<9} {100 * value:6.2f}%")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
