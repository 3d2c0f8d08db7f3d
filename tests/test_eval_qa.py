"""Open-domain QA evaluation (common/eval/qa.py, common/data/qa.py): DPR answer matching, top-k
answer accuracy with BM25 and a dense encoder, the CLI, and bad-input errors."""
import csv
import gzip
import json
import unicodedata

import numpy as np
import pytest

from tests.dist_utils import run_distributed
from twotower.common.data import DataError
from twotower.common.data.qa import QAQuestion, load_dpr_passages, load_qa_questions
from twotower.common.eval.cli import main
from twotower.common.eval.qa import (QAArgs, dpr_tokens, evaluate_qa_bm25, evaluate_qa_dense,
                                     has_answer, top_k_accuracy)


# ------------------------------------------------------------------------ DPR matching
def test_dpr_tokens_split_words_numbers_and_single_symbols():
    assert dpr_tokens("Hello, World! 3.5 don't") == [
        "hello", ",", "world", "!", "3", ".", "5", "don", "'", "t"]
    assert dpr_tokens("  \t\n ") == []
    # combining marks stay inside the word (NFD "é" = "e" + U+0301)
    assert dpr_tokens("Café") == ["cafe\u0301"]


@pytest.mark.parametrize("answers, text, expected", [
    (["Paris"], "the city of PARIS is large", True),           # uncased
    (["paris"], "Paris.", True),                               # punctuation is its own token
    (["art"], "a big party", False),                           # no partial-word match
    (["art"], "modern art, mostly", True),
    (["New York City"], "he moved to new york city in 1990", True),  # multi-token
    (["New York City"], "new york's city hall", False),        # must be contiguous
    (["York New"], "new york", False),                         # order matters
    (["U.S."], "the U.S. navy", True),
    (["U.S."], "the US navy", False),
    (["3,000"], "about 3,000 people", True),
    (["3000"], "about 3,000 people", False),
    (["rock-n-roll"], "rock n roll", False),
    (["Zanzibar", "Pemba"], "the island of pemba", True),       # any answer
    (["Café"], "the cafe opens", False),                       # NFD keeps the accent
    (["Café"], "CAFÉ CENTRAL", True),
    (["Cafe\u0301"], "caf\u00e9", True),                        # NFC and NFD forms agree
])
def test_string_match(answers, text, expected):
    assert has_answer(answers, text) is expected


def test_string_match_equals_a_slow_recomputation_on_joined_tokens():
    texts = ["a big party", "Art: modern art!", "New-York city", "naïve cafe\u0301s", "x y z"]
    answers = ["art", "new - york", "naïve", "cafés", "y z", "z x"]
    for text in texts:
        for answer in answers:
            # independent formulation: the answer's tokens, space-joined, inside the passage's
            # space-joined tokens at token boundaries
            norm = [unicodedata.normalize("NFD", s) for s in (answer, text)]
            a, t = (" ".join(w.lower() for w in dpr_tokens(s)) for s in norm)
            assert has_answer([answer], text) is (f" {a} " in f" {t} "), (answer, text)


def test_regex_match_as_for_curated_trec():
    assert has_answer([r"colou?r"], "The COLOR red", match="regex")       # IGNORECASE
    assert has_answer([r"^second line$"], "first\nsecond line", match="regex")  # MULTILINE
    assert has_answer([r"art"], "a big party", match="regex")       # substring, unlike string
    assert not has_answer([r"\bart\b"], "a big party", match="regex")
    assert has_answer(["caf\u00e9"], "Cafe\u0301", match="regex")           # both NFD
    # an escape inside the pattern is not normalised: \u00e9 stays NFC and misses NFD text
    assert not has_answer([r"caf\u00e9"], "caf\u00e9", match="regex")
    assert not has_answer([r"(unclosed"], "(unclosed", match="regex")      # DPR: bad pattern = no
    assert not has_answer([r"colou?r"], "The COLOR red")                   # string mode is literal


# ------------------------------------------------------------------- a tiny collection
KEYWORDS = ["zorblat", "quinzel", "mavrok", "tepsil", "gundar", "wexpor", "lumbrix", "fadoon"]
FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
# per question: answers, {rank: (text containing, title)} with passage rank r having tf 6 - r
DESIGN = [
    (["Hubert Pym"], {1: "sir hubert pym", 3: "hubert pym"}),                     # first hit 1
    (["1,200 ships"], {1: "1,200 boats", 2: "1,200 ships"}),                      # 2
    (["U.S. Navy"], {2: "us navy", 3: "the u.s. navy"}),                         # 3
    (["New York City"], {4: "new york's city", 5: "New York City"}),              # 5
    (["Zanzibar"], {2: "zanzibari"}),                                             # none
    (["art", "Fine Art"], {1: "party", 4: "fine art"}),                           # 4
    (["Mount Kenya"], {1: ("plain", "Mount Kenya"), 2: "mount kenya"}),           # 2 (title no)
    (["Café Central"], {1: "cafe central", 3: "CAFE\u0301 CENTRAL"}),              # 3
]
FIRST_HIT = [1, 2, 3, 5, None, 4, 2, 3]
KS = (1, 2, 3, 5)


def build_collection():
    passages, questions = [], []
    for i, (keyword, (answers, placed)) in enumerate(zip(KEYWORDS, DESIGN)):
        for rank in range(1, 6):
            extra, title = placed.get(rank, ""), ""
            if isinstance(extra, tuple):
                extra, title = extra
            words = [keyword] * (6 - rank) + extra.split()
            text = " ".join(words + FILLER[: 12 - len(words)])
            passages.append({"id": f"{i}{rank}", "title": title, "text": text})
        questions.append(QAQuestion(str(i), f"what is {keyword}?", answers))
    passages += [{"id": f"x{j}", "title": "Filler", "text": f'note {j} says "hello" to {w}'}
                 for j, w in enumerate(FILLER[:4])]
    return passages, questions


def write_passages(path, passages):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes texts with '"'
        writer.writerow(["id", "text", "title"])
        writer.writerows([p["id"], p["text"], p["title"]] for p in passages)
    return path


def write_qa_csv(path, questions):
    lines = [f"{q.question}\t{json.dumps(q.answers) if i % 2 else repr(q.answers)}"
             for i, q in enumerate(questions)]  # JSON and Python list literals
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    passages, questions = build_collection()
    return {"passages": passages, "questions": questions,
            "psgs": write_passages(root / "psgs.tsv.gz", passages),
            "qas": write_qa_csv(root / "tiny-test.qa.csv", questions)}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_encoder_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder_factory(hidden=32, layers=1, heads=2).save(path)
    return path


def direct_accuracy(ranking, questions, text_of, ks, match="string"):
    """Slow re-computation: has_answer on every one of the top k passages, for every k."""
    return {f"Acc@{k}": float(np.mean([
        any(has_answer(q.answers, text_of[d], match) for d in ranking[q.id][:k])
        for q in questions])) for k in ks}


def test_loaders_read_the_dpr_layouts(collection):
    table = load_dpr_passages(collection["psgs"])
    assert table.to_list() == collection["passages"]  # csv-unquoted ('"hello"' round-trips)
    questions = load_qa_questions(collection["qas"])
    assert questions == collection["questions"]


def test_bm25_known_ranking_gives_known_accuracies(collection):
    passages, questions = collection["passages"], collection["questions"]
    result = evaluate_qa_bm25(passages, questions, QAArgs(ks=KS))
    for i, q in enumerate(questions):  # the designed order: more keyword occurrences first
        ranked = sorted(result.run[q.id], key=lambda d: -result.run[q.id][d])
        assert ranked == [f"{i}{r}" for r in range(1, 6)]
    assert result.first_hit == FIRST_HIT
    assert result.metrics == {"Acc@1": 1 / 8, "Acc@2": 3 / 8, "Acc@3": 5 / 8, "Acc@5": 7 / 8}
    text_of = {p["id"]: p["text"] for p in passages}
    ranking = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in result.run.items()}
    assert result.metrics == direct_accuracy(ranking, questions, text_of, KS)
    assert result.info["n_questions"] == 8 and result.info["k"] == 5


def test_top_k_accuracy_counts_first_hits():
    assert top_k_accuracy([1, None, 3, 20], (1, 3, 20)) == {"Acc@1": .25, "Acc@3": .5,
                                                            "Acc@20": .75}


def test_dense_accuracy_equals_a_direct_recomputation(collection, tiny_encoder_factory):
    passages, questions = collection["passages"], collection["questions"]
    encoder = tiny_encoder_factory(hidden=32, layers=1, heads=2)
    ks = (1, 5, 20)
    result = evaluate_qa_dense(encoder, passages, questions, QAArgs(ks=ks), progress=False)
    docs = encoder.encode([(p["title"] + " " + p["text"]).strip() for p in passages],
                          tower="doc", progress=False)
    queries = encoder.encode([q.question for q in questions], tower="query", progress=False)
    scores = queries @ docs.T
    ids = [p["id"] for p in passages]
    ranking = {q.id: [ids[j] for j in np.argsort(-scores[i], kind="stable")]
               for i, q in enumerate(questions)}
    for q in questions:
        assert list(result.run[q.id]) == ranking[q.id][:20]
    text_of = {p["id"]: p["text"] for p in passages}
    assert result.metrics == pytest.approx(direct_accuracy(ranking, questions, text_of, ks))


def _dense_in_two(rank, world, model_dir, psgs, qas):
    from twotower.common.model.encoder import Encoder

    result = evaluate_qa_dense(Encoder.load(str(model_dir)), load_dpr_passages(psgs),
                               load_qa_questions(qas), QAArgs(ks=(1, 5)), progress=False,
                               shard=True)
    return result.metrics, result.run, result.info["timing"].get("encode_processes")


def test_two_processes_shard_the_passages_and_agree(collection, tiny_model_dir):
    from twotower.common.model.encoder import Encoder

    single = evaluate_qa_dense(Encoder.load(str(tiny_model_dir)), collection["passages"],
                               collection["questions"], QAArgs(ks=(1, 5)), progress=False)
    for metrics, run, processes in run_distributed(
            _dense_in_two, 2, (tiny_model_dir, collection["psgs"], collection["qas"])):
        assert processes == 2 and metrics == single.metrics
        assert {q: list(d) for q, d in run.items()} == {q: list(d) for q, d in single.run.items()}


# ---------------------------------------------------------------------------------- CLI
def test_cli_bm25_writes_outputs_and_refuses_to_overwrite(collection, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--system", "bm25", "--qa-passages", str(collection["psgs"]), "--qa-questions",
            str(collection["qas"]), "--qa-k", "5", "3", "2", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_question.jsonl",
                                                     "run.trec"]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"] == {"Acc@1": 1 / 8, "Acc@2": 3 / 8, "Acc@3": 5 / 8, "Acc@5": 7 / 8}
    assert summary["n_questions"] == 8 and summary["match"] == "string"
    assert "total_s" in summary["timing"]
    rows = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert [r["first_hit_rank"] for r in rows] == FIRST_HIT
    assert rows[7]["answers"] == ["Café Central"] and rows[0]["question"] == "what is zorblat?"
    run = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert [r[2] for r in run if r[0] == "3"] == ["31", "32", "33", "34", "35"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "already has" in capsys.readouterr().err
    (out / "metrics.json").unlink()
    assert main(argv + ["--overwrite", "--qa-match", "regex"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    # as patterns, answers match inside words: "art" in "party" (q5 -> rank 1), "Zanzibar" in
    # "zanzibari" (q4 -> 2); "U.S. Navy" ("." = any character) still misses "us navy" (q2 -> 3)
    assert summary["match"] == "regex" and summary["invalid_answer_patterns"] == 0
    rows = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert [r["first_hit_rank"] for r in rows] == [1, 2, 3, 5, 2, 1, 2, 3]
    assert summary["metrics"] == {"Acc@1": 2 / 8, "Acc@2": 5 / 8, "Acc@3": 7 / 8, "Acc@5": 1.0}


def test_cli_dense_matches_its_own_run(collection, tiny_model_dir, tmp_path):
    out = tmp_path / "dense"
    assert main(["--model", str(tiny_model_dir), "--qa-passages", str(collection["psgs"]),
                 "--qa-questions", str(collection["qas"]), "--qa-k", "1", "10",
                 "--output-dir", str(out), "--no-progress"]) == 0
    ranking = {}
    for line in (out / "run.trec").read_text().splitlines():
        ranking.setdefault(line.split()[0], []).append(line.split()[2])
    assert all(len(docs) == 10 for docs in ranking.values()) and len(ranking) == 8
    text_of = {p["id"]: p["text"] for p in collection["passages"]}
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"] == direct_accuracy(ranking, collection["questions"], text_of,
                                                 (1, 10))
    assert summary["system"] == "dense" and summary["n_docs"] == len(collection["passages"])


@pytest.mark.parametrize("extra, message", [
    (["--qa-passages", "p.tsv"], "go together"),
    (["--qa-passages", "p.tsv", "--qa-questions", "q.csv", "--data", "scifact"],
     "--data do not apply"),
    (["--qa-passages", "p.tsv", "--qa-questions", "q.csv", "--k", "10"], "--k do not apply"),
    (["--qa-passages", "p.tsv", "--qa-questions", "q.csv", "--split", "dev"], "--split"),
    (["--qa-passages", "p.tsv", "--qa-questions", "q.csv", "--qa-k", "0"], "must be > 0"),
    (["--data", "scifact", "--qa-k", "5"], "--qa-k need --qa-passages"),
    (["--data", "scifact", "--qa-match", "regex"], "--qa-match need"),
    (["--qa-passages", "p.tsv", "--qa-questions", "q.csv", "--qa-match", "exact"],
     "invalid choice"),
    ([], "--data is required"),
])
def test_contradictory_flags_are_parser_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["--system", "bm25", "--output-dir", str(tmp_path / "o")] + extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- bad input
HEADER = "id\ttext\ttitle\n"


@pytest.mark.parametrize("content, line, reason", [
    (HEADER + "1\tfoo\tT\n2\tbar\tT\n1\tbaz\tT\n", 4, "duplicate passage id '1': also on line 2"),
    (HEADER + "1\tfoo\tT\n2\t\"unterminated\tT\n", 3, "malformed quoting"),
    (HEADER + "1\tfoo\n", 2, "expected 3 tab-separated columns"),
    ("1\tfoo\tT\n", 1, "expected the DPR header"),
    (HEADER + "1\t\tT\n2\t \t \n", 3, "empty passage"),
    (HEADER.encode() + b"1\tfoo\tT\n2\tb\xffd\tT\n", 3, "invalid UTF-8"),
    (HEADER + "a b\tfoo\tT\n", 2, "contains whitespace"),
])
def test_bad_passages_name_file_and_line(tmp_path, content, line, reason):
    path = tmp_path / "psgs.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as exc:
        load_dpr_passages(path)
    assert str(exc.value).startswith(f"{path}:{line}: ") and reason in str(exc.value)


@pytest.mark.parametrize("name, content, line, reason", [
    ("q.qa.csv", "who?\t['a']\nwhat?\t['b'\n", 2, "not a list literal"),
    ("q.qa.csv", "who?\t['a']\n \t['b']\n", 2, "empty question"),
    ("q.qa.csv", "who?\t[]\n", 1, "non-empty list"),
    ("q.qa.csv", "who?\t['a', ' ']\n", 1, "blank answer"),
    ("q.qa.csv", "who?\t['a', 3]\n", 1, "not a string"),
    ("q.qa.csv", "who?\n", 1, "expected 2 tab-separated columns"),
    ("q.qa.csv", b"who?\t['a']\nwh\xc3o?\t['b']\n", 2, "invalid UTF-8"),
    ("q.jsonl", '{"question": "who?", "answers": ["a"]}\n{"question": "x"}\n', 2,
     "missing field 'answers'"),
    ("q.jsonl", '{"question": "who?", "answers": "a"}\n', 1, "non-empty list"),
    ("q.jsonl", '{"id": "q1", "question": "a?", "answers": ["a"]}\n'
                '{"id": "q1", "question": "b?", "answers": ["b"]}\n', 2,
     "duplicate question id 'q1': also on line 1"),
    ("q.jsonl", '{"question": "", "answers": ["a"]}\n', 1, "empty question"),
    ("q.jsonl", '{"question": "a?", "answers": ["a"]\n', 1, "malformed JSON"),
])
def test_bad_questions_name_file_and_line(tmp_path, name, content, line, reason):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as exc:
        load_qa_questions(path)
    assert str(exc.value).startswith(f"{path}:{line}: ") and reason in str(exc.value)


def test_jsonl_questions_keep_their_ids(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 7, "question": "who?", "answers": ["a"]}\n'
                    '{"question": "what?", "answers": ["b", "c"]}\n')
    assert load_qa_questions(path) == [QAQuestion("7", "who?", ["a"]),
                                       QAQuestion("1", "what?", ["b", "c"])]


def test_cli_bad_input_exits_with_file_and_line(collection, tmp_path, capsys):
    qas = tmp_path / "bad.qa.csv"
    qas.write_text("who?\t['a']\nwhat?\tnot a list\n")
    with pytest.raises(SystemExit) as exc:
        main(["--system", "bm25", "--qa-passages", str(collection["psgs"]), "--qa-questions",
              str(qas), "--output-dir", str(tmp_path / "o")])
    assert exc.value.code == 1 and f"{qas}:2: " in capsys.readouterr().err
