"""HTML/markdown reports (common/eval/html.py), rendered in headless Chromium when present."""
import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.fixtures_data import write_jsonl, write_text
from twotower.common.eval.evaluate import evaluate_bm25, load_eval_data
from twotower.common.eval.html import (examples_markdown, image_data_uri, select_examples,
                                       write_eval_html, write_html_report)
from twotower.common.eval.outputs import write_outputs
from twotower.common.report.analyze import AnalyzeArgs, analyze_embeddings, write_analysis
from twotower.common.report.plots import png_to_array

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QRELS = {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}, "q3": {"d9": 1}, "q4": {"d1": 1}}
RUN = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1},  # relevant at rank 2
       "q2": {"d3": 0.7, "d1": 0.2},  # relevant at rank 1
       "q3": {"d1": 0.5, "d2": 0.5},  # relevant never retrieved; tie broken by doc id
       "q4": {"d1": 0.9}}
VALUES = {"q1": 0.5, "q2": 1.0, "q3": 0.0, "q4": 1.0}
QUERIES = {"q1": "first <query>", "q2": "second", "q3": "third", "q4": "fourth"}
CORPUS = {"d1": "alpha " * 200, "d2": "<script>alert(1)</script> beta", "d3": "gamma"}


def test_best_and_worst_examples():
    ex = select_examples(VALUES, RUN, QRELS, QUERIES, CORPUS, "nDCG@10", n=2, top_k=2,
                         max_chars=30)
    assert [e.query_id for e in ex.best] == ["q2", "q4"]  # ties by query id
    assert [e.query_id for e in ex.worst] == ["q3", "q1"]
    q1 = ex.worst[1]
    assert (q1.first_relevant_rank, q1.n_relevant, q1.query) == (2, 1, "first <query>")
    assert [(d.doc_id, d.relevance) for d in q1.retrieved] == [("d2", 0), ("d1", 2)]
    assert q1.retrieved[1].text.endswith("…") and len(q1.retrieved[1].text) <= 31
    q3 = ex.worst[0]
    assert q3.first_relevant_rank is None
    assert [(d.doc_id, d.relevance) for d in q3.retrieved] == [("d1", None), ("d2", None)]
    # fewer than 2n queries: the two lists split them without repeating a query
    few = select_examples(VALUES, RUN, QRELS, QUERIES, CORPUS, "nDCG@10", n=5)
    assert len(few.best) == 2 and len(few.worst) == 2
    assert not {e.query_id for e in few.best} & {e.query_id for e in few.worst}
    md = examples_markdown(ex)
    assert "## Worst queries by nDCG@10" in md and "judged not relevant" in md
    assert "first relevant at rank none retrieved" in md and "relevant (2)" in md


def tiny_png(colour=(200, 30, 30)):
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.imshow(np.full((4, 4, 3), colour, dtype=np.uint8))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_page_is_self_contained_and_escaped(tmp_path):
    png = tiny_png()
    (tmp_path / "plot.png").write_bytes(png)
    path = write_html_report(
        tmp_path / "r.html", title="T & <b>", metrics={"nDCG@10": 0.12345},
        info={"model": "m", "timing": {"total_s": 1.5}}, per_query={"nDCG@10": VALUES},
        queries=QUERIES, corpus_lookup=CORPUS.get, run=RUN, qrels=QRELS,
        images={"from bytes": png, "from file": tmp_path / "plot.png"},
        recipe_yaml="train:\n  lr: 1e-5\n", n_examples=1)
    page = path.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert "T &amp; &lt;b&gt;" in page and "0.1235" in page and "timing.total_s" in page
    assert "lr: 1e-5" in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png
    assert "Best queries by nDCG@10" in page and "second" in page and "third" in page
    with pytest.raises(ValueError, match="not a PNG"):
        image_data_uri(b"GIF89a...")
    with pytest.raises(KeyError, match="MRR"):
        write_html_report(tmp_path / "x.html", title="t", metrics={}, per_query={"nDCG@10": {}},
                          run={}, qrels={}, example_measure="MRR@10")


def tiny_beir(root):
    words = ["apple", "river", "cloud", "stone", "music", "tiger"]
    write_jsonl(root / "corpus.jsonl", [{"_id": f"d{i}", "title": w.title(),
                                         "text": f"{w} facts"} for i, w in enumerate(words)])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"about {w}"}
                                         for i, w in enumerate(words[:4])])
    write_text(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n"
               + "".join(f"q{i}\td{(i + (i == 3))}\t1\n" for i in range(4)))  # q3 is missed
    return root


def eval_report(tmp_path):
    data = load_eval_data(str(tiny_beir(tmp_path / "tiny")), "test")
    result = evaluate_bm25(data, k=3)
    write_outputs(result, tmp_path / "eval")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("model:\n  name_or_path: x\n")
    (tmp_path / "run" / "model").mkdir()
    result.info["model"] = str(tmp_path / "run" / "model")  # as for a trained model folder
    return write_eval_html(result, tmp_path / "eval" / "report.html", data=data), result


def test_eval_report_has_examples_passages_and_recipe(tmp_path):
    path, result = eval_report(tmp_path)
    page = path.read_text()
    assert "Apple apple facts" in page  # title + text of a retrieved passage
    worst = page[page.index("Worst queries"):]
    assert "<b>q3</b>: about stone" in worst  # judged relevant to "music": BM25 misses it
    assert "first relevant at rank none retrieved" in worst
    assert "name_or_path: x" in page  # recipe found beside the model folder
    assert page.count("data:image/png;base64,") == 1  # per-query histogram
    assert f"{result.metrics['nDCG@10']:.4f}" in page


def chromium(url, *flags, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                    "chromium; CI installs it in .ci/run)")
def test_pages_render_with_their_images_in_headless_chromium(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(40, 16))
    docs = np.concatenate([q + 0.3 * rng.normal(size=q.shape), rng.normal(size=(40, 16))])
    analysis = analyze_embeddings(q, docs, [(i, i) for i in range(40)], args=AnalyzeArgs())
    analyze_page = write_analysis(analysis, tmp_path / "analysis", {"model": "synthetic"})
    eval_page, _ = eval_report(tmp_path)
    broken = tmp_path / "broken.html"  # control: a truncated PNG must be reported as not loaded
    text = analyze_page["report.html"].read_text()
    first = re.search(r"data:image/png;base64,([^\"]+)", text).group(1)
    broken.write_text(text.replace(first, base64.b64encode(base64.b64decode(first)[:60]).decode()))
    for page, expected in ((analyze_page["report.html"], "2/2"), (eval_page, "1/1"),
                           (broken, "1/2")):
        dom = chromium(page.resolve().as_uri(), "--dump-dom", tmp_path=tmp_path)
        assert dom.returncode == 0, dom.stderr[-2000:]
        marker = re.search(r'data-images-loaded="([^"]+)"', dom.stdout)
        assert marker and marker.group(1) == expected, (page, dom.stdout[:500])
    shot = tmp_path / "shot.png"
    result = chromium(analyze_page["report.html"].resolve().as_uri(), f"--screenshot={shot}",
                      "--window-size=1200,2000", "--hide-scrollbars", tmp_path=tmp_path)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = png_to_array(shot.read_bytes())
    # the scatter plot's query colour (#d95f02) only appears if the image was painted
    orange = np.all(np.abs(pixels.astype(int) - [0xD9, 0x5F, 0x02]) < 40, axis=-1)
    assert orange.sum() > 50
