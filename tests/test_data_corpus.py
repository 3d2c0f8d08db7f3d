"""Generic corpus/query readers: formats, bad-input matrix, counted skipping, caching."""

import gzip
import logging
import os
import random
import shutil
from pathlib import Path

import datasets
import pytest

from tests.fixtures_data import (DOCS, QUERIES, at, gzip_file, rows, write_bytes, write_jsonl,
                                 write_text, write_tsv)
from twotower.common.data import DataError, SkipReport, build, load_corpus, load_queries

EXPECTED_DOCS = [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in DOCS]
EXPECTED_QUERIES = [{"id": q["_id"], "text": q["text"]} for q in QUERIES]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


# ----------------------------------------------------------------------------- round trips
def test_jsonl_corpus_round_trip(tmp_path, cache):
    ds = load_corpus(write_jsonl(tmp_path / "c.jsonl", DOCS), cache_dir=cache)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["id", "title", "text"]
    assert rows(ds) == EXPECTED_DOCS


def test_gzip_and_plain_give_the_same_rows(tmp_path, cache):
    plain = write_jsonl(tmp_path / "c.jsonl", DOCS)
    packed = gzip_file(plain)
    assert rows(load_corpus(packed, cache_dir=cache)) == EXPECTED_DOCS


def test_custom_fields_int_ids_and_missing_title(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", [{"doc_id": 7, "contents": "seven"},
                                              {"doc_id": "8", "contents": "eight", "name": "x"}])
    ds = load_corpus(path, id_field="doc_id", text_field="contents", title_field="name",
                     cache_dir=cache)
    assert rows(ds) == [{"id": "7", "title": "", "text": "seven"},
                        {"id": "8", "title": "x", "text": "eight"}]


def test_tsv_corpus_two_and_three_columns(tmp_path, cache):
    two = write_tsv(tmp_path / "two.tsv", [("1", "first passage"), ("2", "second")])
    assert rows(load_corpus(two, cache_dir=cache)) == [
        {"id": "1", "title": "", "text": "first passage"},
        {"id": "2", "title": "", "text": "second"}]
    three = write_tsv(tmp_path / "three.tsv", [("1", "body one", "Title one")])
    assert rows(load_corpus(three, cache_dir=cache)) == [
        {"id": "1", "title": "Title one", "text": "body one"}]


def test_tsv_header_and_explicit_columns(tmp_path, cache):
    dpr = write_tsv(tmp_path / "psgs.tsv", [("id", "text", "title"), ("1", "body", "T")])
    assert rows(load_corpus(dpr, cache_dir=cache)) == [{"id": "1", "title": "T", "text": "body"}]
    other = write_tsv(tmp_path / "other.tsv", [("T", "x", "1", "body")])
    ds = load_corpus(other, tsv_columns=("title", "_", "id", "text"), cache_dir=cache)
    assert rows(ds) == [{"id": "1", "title": "T", "text": "body"}]


def test_queries_jsonl_and_tsv(tmp_path, cache):
    assert rows(load_queries(write_jsonl(tmp_path / "q.jsonl", QUERIES), cache_dir=cache)) \
        == EXPECTED_QUERIES
    tsv = write_tsv(tmp_path / "q.tsv", [(q["_id"], q["text"]) for q in QUERIES])
    assert rows(load_queries(tsv, cache_dir=cache)) == EXPECTED_QUERIES


def test_bom_and_crlf_are_handled(tmp_path, cache):
    text = "\ufeff" + "".join(f"{q['_id']}\t{q['text']}\r\n" for q in QUERIES)
    assert rows(load_queries(write_text(tmp_path / "q.tsv", text), cache_dir=cache)) \
        == EXPECTED_QUERIES
    jsonl = "\ufeff" + "\r\n".join(
        '{"_id": "%s", "title": "%s", "text": "%s"}' % (d["_id"], d["title"], d["text"])
        for d in DOCS) + "\r\n"
    assert rows(load_corpus(write_text(tmp_path / "c.jsonl", jsonl), cache_dir=cache)) \
        == EXPECTED_DOCS


def test_blank_lines_hold_no_record(tmp_path, cache):
    path = write_text(tmp_path / "q.tsv", "q1\tone\n\n  \nq2\ttwo\n\n")
    assert rows(load_queries(path, cache_dir=cache)) == [{"id": "q1", "text": "one"},
                                                        {"id": "q2", "text": "two"}]


# ----------------------------------------------------------------------- bad-input matrix
GOOD = '{"_id": "a", "title": "t", "text": "alpha"}\n'
BAD_CORPUS_LINES = [  # (second line of a corpus.jsonl, expected message after "file:2: ")
    ('{"_id": "b", "text": }', r"malformed JSON \(Expecting value at column 22\)"),
    ('{"_id": "b", "title": "t"}', r"missing field 'text' \(fields present: _id, title\)"),
    ('{"title": "t", "text": "x"}', r"missing field '_id' \(fields present: title, text\)"),
    ('{"_id": "b", "title": " ", "text": " \\t "}',
     "empty document: title and text are both empty or whitespace-only"),
    ('{"_id": "", "text": "x"}', "empty id in field '_id'"),
    ('{"_id": 1.5, "text": "x"}', "field '_id' must be a string or integer id, got 1.5"),
    ('{"_id": "b", "text": 3}', "field 'text' must be a string, got int"),
    ('["b", "x"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,message", BAD_CORPUS_LINES)
def test_bad_corpus_line_names_file_and_line(tmp_path, cache, line, message):
    path = write_text(tmp_path / "corpus.jsonl", GOOD + line + "\n" + GOOD.replace('"a"', '"z"'))
    with pytest.raises(DataError, match=at(path, 2) + message):
        load_corpus(path, cache_dir=cache)


def test_whitespace_only_query_text(tmp_path, cache):
    path = write_jsonl(tmp_path / "q.jsonl", [QUERIES[0], {"_id": "q9", "text": " \n "}])
    with pytest.raises(DataError, match=at(path, 2) + "empty or whitespace-only text"):
        load_queries(path, cache_dir=cache)


def test_duplicate_id_names_both_lines(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", [DOCS[0], DOCS[1], DOCS[2], DOCS[1]])
    with pytest.raises(DataError, match=at(path, 4) + "duplicate document id 'd2': also on line 2"):
        load_corpus(path, cache_dir=cache)
    tsv = write_tsv(tmp_path / "q.tsv", [("id", "text"), ("q1", "a"), ("q1", "b")])
    with pytest.raises(DataError, match=at(tsv, 3) + "duplicate query id 'q1': also on line 2"):
        load_queries(tsv, cache_dir=cache)


def test_non_utf8_bytes_give_line_and_byte_offset(tmp_path, cache):
    first = GOOD.encode()
    second = b'{"_id": "b", "text": "caf\xe9"}\n'
    path = write_bytes(tmp_path / "c.jsonl", first + second)
    column = second.index(b"\xe9")
    offset = len(first) + column
    with pytest.raises(DataError, match=at(path, 2) + f"invalid UTF-8 byte 0xe9 at byte offset "
                       f"{offset} of the file \\(column {column + 1} of the line\\)"):
        load_corpus(path, cache_dir=cache)


def test_tsv_wrong_column_count(tmp_path, cache):
    path = write_text(tmp_path / "collection.tsv", "1\tone\n2\ttwo\textra\n")
    with pytest.raises(DataError, match=at(path, 2) + "expected 2 tab-separated columns, got 3"):
        load_corpus(path, cache_dir=cache)


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n", b"\xef\xbb\xbf\r\n"])
def test_empty_file(tmp_path, cache, content):
    path = write_bytes(tmp_path / "c.jsonl", content)
    with pytest.raises(DataError, match=at(path) + r"empty file \(no non-blank lines\)"):
        load_corpus(path, cache_dir=cache)


def test_truncated_gzip_names_file_and_line_reached(tmp_path, cache):
    rng = random.Random(0)
    docs = [{"_id": str(i), "text": " ".join(str(rng.random()) for _ in range(20))}
            for i in range(3000)]
    packed = gzip.compress(write_jsonl(tmp_path / "c.jsonl", docs).read_bytes())
    path = write_bytes(tmp_path / "cut.jsonl.gz", packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"truncated or corrupt gzip") as info:
        load_corpus(path, cache_dir=cache)
    assert info.value.path == str(path)
    assert 1 < info.value.line < 3000  # stopped part-way, and says where
    assert f"{path}:{info.value.line}: " in str(info.value)


def test_missing_file_and_directory(tmp_path, cache):
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "nope.jsonl", cache_dir=cache)
    with pytest.raises(DataError, match=at(tmp_path) + "is a directory"):
        load_corpus(tmp_path, cache_dir=cache)


def test_unknown_format_and_uninferable_tsv(tmp_path, cache):
    path = write_text(tmp_path / "corpus.data", "x")
    with pytest.raises(DataError, match="pass fmt='jsonl' or fmt='tsv'"):
        load_corpus(path, cache_dir=cache)
    wide = write_tsv(tmp_path / "wide.tsv", [("1", "a", "b", "c")])
    with pytest.raises(DataError, match=at(wide, 1) + "cannot infer the TSV columns"):
        load_corpus(wide, cache_dir=cache)


# ------------------------------------------------------------------------ counted skipping
def _messy_corpus(tmp_path):
    lines = [GOOD.strip(), "{not json", '{"_id": "b", "title": "t"}',
             '{"_id": "c", "text": "gamma"}', '{"_id": "a", "text": "again"}',
             '{"_id": "d", "text": "  "}', '{"_id": "e", "text": "epsilon"}']
    return write_text(tmp_path / "messy.jsonl", "\n".join(lines) + "\n")


def test_skip_counts_and_reports_bad_lines(tmp_path, cache, caplog):
    path = _messy_corpus(tmp_path)
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="twotower.common.data"):
        ds = load_corpus(path, on_error="skip", report=report, cache_dir=cache)
    assert [r["id"] for r in ds] == ["a", "c", "e"]  # first "a" wins over line 5
    assert report.total == 4
    assert report.counts == {(str(path), "malformed JSON"): 1, (str(path), "missing field"): 1,
                             (str(path), "duplicate document id"): 1, (str(path), "empty text"): 1}
    summary = report.summary()
    assert summary.startswith("skipped 4 bad line(s):")
    assert f"{path}: 1 x malformed JSON (e.g. line 2)" in summary
    assert f"{path}: 1 x duplicate document id (e.g. line 5)" in summary
    assert summary in caplog.text  # logged at the end of reading


def test_skip_report_survives_a_cache_hit(tmp_path, cache, caplog):
    path = _messy_corpus(tmp_path)
    first, second, third = SkipReport(), SkipReport(), SkipReport()
    load_corpus(path, on_error="skip", report=first, cache_dir=cache)
    with caplog.at_level(logging.WARNING, logger="twotower.common.data"):
        ds = load_corpus(path, on_error="skip", report=second, cache_dir=cache)
    assert len(ds) == 3 and second.counts == first.counts
    assert "from the cached build" in caplog.text
    sidecar = os.path.join(os.path.dirname(ds.cache_files[0]["filename"]),
                           "twotower_skip_report.json")
    os.remove(sidecar)  # a cache without its report is counted again, not reported as clean
    load_corpus(path, on_error="skip", report=third, cache_dir=cache)
    assert third.counts == first.counts


def test_raise_mode_never_reuses_a_skipping_build(tmp_path, cache):
    path = _messy_corpus(tmp_path)
    load_corpus(path, on_error="skip", cache_dir=cache)
    with pytest.raises(DataError, match=at(path, 2) + "malformed JSON"):
        load_corpus(path, cache_dir=cache)


def test_all_lines_bad_is_an_error_even_when_skipping(tmp_path, cache):
    path = write_text(tmp_path / "c.jsonl", "{bad\n[1]\n")
    with pytest.raises(DataError, match=at(path) + r"no valid records \(2 bad line\(s\) skipped\)"):
        load_corpus(path, on_error="skip", cache_dir=cache)


def test_on_error_value_is_checked(tmp_path, cache):
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_corpus(write_jsonl(tmp_path / "c.jsonl", DOCS), on_error="ignore", cache_dir=cache)


# ------------------------------------------------------------------- caching and streaming
def test_changed_file_is_read_again(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    assert rows(load_corpus(path, cache_dir=cache)) == EXPECTED_DOCS
    stat = path.stat()
    write_jsonl(path, [dict(DOCS[0], text=DOCS[0]["text"].upper()), DOCS[1], DOCS[2]])
    assert path.stat().st_size == stat.st_size  # same size: only mtime tells them apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_corpus(path, cache_dir=cache)[0]["text"] == DOCS[0]["text"].upper()


def test_files_with_equal_content_do_not_collide(tmp_path, cache):
    one = write_jsonl(tmp_path / "a" / "c.jsonl", DOCS[:1])
    two = write_jsonl(tmp_path / "b" / "c.jsonl", DOCS[1:2])
    assert load_corpus(one, cache_dir=cache)[0]["id"] == "d1"
    assert load_corpus(two, cache_dir=cache)[0]["id"] == "d2"


def test_streaming_yields_the_same_rows_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    ds = load_corpus(path, streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert rows(ds) == EXPECTED_DOCS
    bad = write_text(tmp_path / "bad.jsonl", GOOD + "{oops\n")
    with pytest.raises(DataError, match=at(bad, 2) + "malformed JSON"):
        list(load_corpus(bad, streaming=True))
    report = SkipReport()
    stream = load_corpus(bad, streaming=True, on_error="skip", report=report)
    for _ in range(2):  # each pass recounts; counts are not added up across passes
        assert len(list(stream)) == 1
        assert report.counts == {(str(bad), "malformed JSON"): 1}


def test_cached_tables_key_on_the_readers_code_only(tmp_path):
    """An edited reader rebuilds every cached table; editing what cannot change a table (the
    re-exports, id indexes, bars, file resolution) must not re-read an 8.8 M collection."""
    folder = tmp_path / "data"
    shutil.copytree(Path(build.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = build.source_hash(folder)
    assert before == build._code_hash()
    for name in ("__init__.py", "ids.py", "progress.py", "resolve.py"):
        (folder / name).write_text((folder / name).read_text() + "\n# edited\n")
        assert build.source_hash(folder) == before, name
    for name in ("msmarco.py", "io.py", "build.py", "scores.py"):
        (folder / name).write_text((folder / name).read_text() + "\n# edited\n")
        changed = build.source_hash(folder)
        assert changed != before, name
        before = changed
