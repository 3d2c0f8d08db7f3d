"""Self-contained HTML (and markdown) reports: metrics, plots, best and worst queries.

The page has no external resource: images are base64 `data:` URIs, style and script are inline,
so the one file can be mailed, archived or opened offline. An inline script marks `<body>` with
`data-images-loaded="N/M"` once the page has loaded (tests/test_html_report.py opens the page in
headless Chromium and reads it back).

Library:
    select_examples(values, run, qrels, queries, corpus_lookup, measure) -> Examples
    examples_markdown(examples) -> str
    render_html(title=..., metrics=..., ...) -> str;  write_html_report(path, ...) -> Path
    eval_examples(result, data) / write_eval_html(result, path, data=...): for twotower.common.eval.evaluate
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from twotower.common.data import column
from twotower.common.eval.figures import plot_per_query

ImageSource = Union[bytes, str, Path]
Lookup = Union[Mapping[str, str], Callable[[str], str]]
MISSING_TEXT = "(text not available)"


@dataclass
class Retrieved:
    rank: int
    doc_id: str
    score: float
    relevance: int | None  # None = not judged for this query
    text: str


@dataclass
class QueryExample:
    query_id: str
    query: str
    value: float
    n_relevant: int  # judged relevance > 0
    first_relevant_rank: int | None  # in the whole ranking; None = no relevant document retrieved
    retrieved: list[Retrieved] = field(default_factory=list)


@dataclass
class Examples:
    measure: str
    best: list[QueryExample]
    worst: list[QueryExample]


def _truncate(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + "…"


def _lookup(source: Lookup | None, key: str) -> str:
    if source is None:
        return MISSING_TEXT
    if callable(source) and not isinstance(source, Mapping):
        return source(key)
    return source.get(key, MISSING_TEXT)


def _example(qid: str, value: float, run, qrels, queries, corpus_lookup, top_k: int,
             max_chars: int) -> QueryExample:
    judged = qrels.get(qid, {})
    # descending score, ties by document id: the order twotower.common.data.write_run writes
    ranking = sorted(run.get(qid, {}).items(), key=lambda item: (-item[1], item[0]))
    first = next((rank for rank, (doc, _) in enumerate(ranking, 1) if judged.get(doc, 0) > 0),
                 None)
    return QueryExample(
        query_id=qid, query=_truncate(_lookup(queries, qid), max_chars), value=value,
        n_relevant=sum(1 for r in judged.values() if r > 0), first_relevant_rank=first,
        retrieved=[Retrieved(rank, doc, float(score), judged.get(doc),
                             _truncate(_lookup(corpus_lookup, doc), max_chars))
                   for rank, (doc, score) in enumerate(ranking[:top_k], 1)])


def select_examples(values: Mapping[str, float], run: Mapping[str, Mapping[str, float]],
                    qrels: Mapping[str, Mapping[str, int]], queries: Lookup | None,
                    corpus_lookup: Lookup | None, measure: str, n: int = 5, top_k: int = 3,
                    max_chars: int = 300) -> Examples:
    """The `n` queries with the highest and the `n` with the lowest value of `measure`
    (`values`: {query id: value}; ties by query id), each with its top `top_k` documents.
    With fewer than 2n queries the two lists split them without overlap."""
    order = sorted(values, key=lambda q: (-values[q], q))
    n_best = min(n, (len(order) + 1) // 2)
    best_ids = order[:n_best]
    worst_ids = [q for q in reversed(order) if q not in set(best_ids)][:n]
    make = lambda q: _example(q, float(values[q]), run, qrels, queries, corpus_lookup,  # noqa: E731
                              top_k, max_chars)
    return Examples(measure, [make(q) for q in best_ids], [make(q) for q in worst_ids])


def _relevance_label(rel: int | None) -> str:
    if rel is None:
        return "not judged"
    return f"relevant ({rel})" if rel > 0 else "judged not relevant"


def examples_markdown(examples: Examples) -> str:
    """Markdown section with the best and worst queries (to append to report.md)."""
    lines: list[str] = []
    for heading, items in (("Best", examples.best), ("Worst", examples.worst)):
        lines += ["", f"## {heading} queries by {examples.measure}", ""]
        for ex in items:
            first = ex.first_relevant_rank or "none retrieved"
            lines.append(f"- **{ex.query_id}** ({examples.measure} {ex.value:.4f}; "
                         f"{ex.n_relevant} relevant; first relevant at rank {first}): {ex.query}")
            for doc in ex.retrieved:
                text = doc.text.replace("|", "\\|")
                lines.append(f"    {doc.rank}. `{doc.doc_id}` score {doc.score:.4g}, "
                             f"{_relevance_label(doc.relevance)}: {text}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- HTML
_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}figure{display:inline-block;margin:.5em 1em .5em 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.query{margin:.8em 0;padding:.5em .8em;background:#fafafa;border-left:4px solid #999}
.rel{color:#1a7f37;font-weight:600}.nonrel{color:#b42318}.unj{color:#777}
ol{margin:.3em 0}li{margin:.25em 0}code{font-size:.9em}pre{background:#f6f6f6;padding:.8em;
overflow-x:auto}
"""
# Marks the page once loaded, so a headless browser (tests) can prove every image decoded.
_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-loaded', loaded.length + '/' + images.length);
});
"""


def image_data_uri(image: ImageSource) -> str:
    """A PNG (bytes or a file path) as a `data:image/png;base64,...` URI."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"not a PNG image: {image if isinstance(image, (str, Path)) else 'bytes'}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(rows: Mapping[str, Any], header: tuple[str, str],
           notes: Mapping[str, str] | None = None) -> str:
    """Key/value rows; with `notes`, a third column explains each key."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in (*header, *(("meaning",) if notes else ())))
    body = "".join(
        f"<tr><td>{_esc(k)}</td><td class=\"{'num' if isinstance(v, (int, float)) else ''}\">"
        f"{_esc(_fmt(v))}</td>" + (f"<td>{_esc(notes.get(k, ''))}</td>" if notes else "")
        + "</tr>" for k, v in rows.items() if v is not None)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(info: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _examples_html(examples: Examples) -> str:
    parts = []
    for heading, items in (("Best", examples.best), ("Worst", examples.worst)):
        parts.append(f"<h2>{heading} queries by {_esc(examples.measure)}</h2>")
        for ex in items:
            first = ex.first_relevant_rank or "none retrieved"
            docs = "".join(
                f"<li value=\"{d.rank}\"><code>{_esc(d.doc_id)}</code> "
                f"<span class=\"{'unj' if d.relevance is None else 'rel' if d.relevance > 0 else 'nonrel'}\">"
                f"{_esc(_relevance_label(d.relevance))}</span>, score {d.score:.4g}<br>"
                f"{_esc(d.text)}</li>" for d in ex.retrieved)
            parts.append(
                f"<div class=\"query\"><b>{_esc(ex.query_id)}</b>: {_esc(ex.query)}<br>"
                f"<small>{_esc(examples.measure)} {ex.value:.4f}; {ex.n_relevant} relevant "
                f"document(s); first relevant at rank {_esc(first)}</small><ol>{docs}</ol></div>")
    return "\n".join(parts)


def render_html(*, title: str, metrics: Mapping[str, float],
                info: Mapping[str, Any] | None = None,
                images: Mapping[str, ImageSource] | None = None,
                examples: Examples | None = None, recipe_yaml: str | None = None,
                tables: Mapping[str, Mapping[str, Any]] | None = None,
                metrics_header: tuple[str, str] = ("metric", "value"),
                metric_notes: Mapping[str, str] | None = None) -> str:
    """The page as a string. `images` maps a caption to PNG bytes or a PNG path; `tables` adds
    named key/value tables after the metrics; `metric_notes` explains metrics in a column."""
    body = [f"<h1>{_esc(title)}</h1>"]
    if info:
        body += ["<h2>Run</h2>", _table(_flatten(info), ("field", "value"))]
    body += ["<h2>Metrics</h2>", _table(dict(metrics), metrics_header, metric_notes)]
    for name, rows in (tables or {}).items():
        body += [f"<h2>{_esc(name)}</h2>", _table(rows, ("quantity", "value"))]
    if images:
        body.append("<h2>Plots</h2>")
        body += [f"<figure><img src=\"{image_data_uri(src)}\" alt=\"{_esc(caption)}\">"
                 f"<figcaption>{_esc(caption)}</figcaption></figure>"
                 for caption, src in images.items()]
    if examples is not None:
        body.append(_examples_html(examples))
    if recipe_yaml:
        body += ["<h2>Recipe</h2>", f"<pre>{_esc(recipe_yaml)}</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def write_html_report(path: str | Path, *, title: str, metrics: Mapping[str, float],
                      info: Mapping[str, Any] | None = None,
                      per_query: Mapping[str, Mapping[str, float]] | None = None,
                      queries: Lookup | None = None, corpus_lookup: Lookup | None = None,
                      run: Mapping[str, Mapping[str, float]] | None = None,
                      qrels: Mapping[str, Mapping[str, int]] | None = None,
                      images: Mapping[str, ImageSource] | None = None,
                      recipe_yaml: str | None = None, example_measure: str | None = None,
                      n_examples: int = 5, top_k: int = 3,
                      tables: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the page. Best/worst queries appear when `per_query` ({measure: {qid: value}}),
    `run` and `qrels` are given (`example_measure` defaults to the first measure)."""
    examples = None
    if per_query and run is not None and qrels is not None:
        measure = example_measure or next(iter(per_query))
        if measure not in per_query:
            raise KeyError(f"example measure {measure!r} not in per-query results "
                           f"({', '.join(per_query)})")
        examples = select_examples(per_query[measure], run, qrels, queries, corpus_lookup,
                                   measure, n_examples, top_k)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title=title, metrics=metrics, info=info, images=images,
                                examples=examples, recipe_yaml=recipe_yaml, tables=tables),
                    encoding="utf-8")
    return path


# ------------------------------------------------------------ twotower.common.eval.evaluate integration
def eval_examples(result, data, measure: str | None = None, n: int = 5, top_k: int = 3,
                  max_chars: int = 300) -> Examples:
    """Best/worst queries of an EvalResult, with texts from its RetrievalData (only the shown
    documents' texts are looked up)."""
    measure = measure or next(iter(result.per_query))
    queries = dict(zip((str(q) for q in column(data.queries, "id")), column(data.queries, "text")))
    examples = select_examples(result.per_query[measure], result.run, data.qrels, queries, None,
                               measure, n, top_k)
    shown = [doc for ex in examples.best + examples.worst for doc in ex.retrieved]
    needed = {doc.doc_id for doc in shown}
    ids = [str(d) for d in column(data.corpus, "id")]
    rows = [i for i, d in enumerate(ids) if d in needed]
    picked = data.corpus.select(rows)
    titles = column(picked, "title") if "title" in picked.column_names else [""] * len(rows)
    texts = {ids[i]: f"{t or ''} {x or ''}".strip()  # twotower.common.model.encoder.doc_text's convention
             for i, t, x in zip(rows, titles, column(picked, "text"))}
    for doc in shown:
        doc.text = _truncate(texts.get(doc.doc_id, MISSING_TEXT), max_chars)
    return examples


def find_recipe_yaml(model: str | None) -> str | None:
    """recipe.yaml of a twotower run when `model` is its output folder or output_dir/model."""
    if not model or not Path(model).is_dir():
        return None
    for candidate in (Path(model) / "recipe.yaml", Path(model).parent / "recipe.yaml"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return None


def write_eval_html(result, path: str | Path, *, data=None, examples: Examples | None = None,
                    extra: Mapping[str, Any] | None = None, recipe_yaml: str | None = None,
                    images: Mapping[str, ImageSource] | None = None) -> Path:
    """report.html of an EvalResult: run info, metrics, a per-query histogram of the first
    measure (plus `images`), best/worst queries (`examples`, or computed from `data`) and the
    recipe (given, or found beside the model folder)."""
    info = {**dict(result.info), **dict(extra or {})}
    measure = next(iter(result.per_query))
    all_images: dict[str, ImageSource] = {
        f"per-query {measure}": plot_per_query(result.per_query[measure], measure)}
    all_images.update(images or {})
    if examples is None and data is not None:
        examples = eval_examples(result, data)
    title = (f"Evaluation: {info.get('model', info.get('system', '?'))} on "
             f"{info.get('data', '?')} ({info.get('split', '?')})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe_yaml = recipe_yaml or find_recipe_yaml(info.get("model"))
    path.write_text(render_html(title=title, metrics=result.metrics, info=info,
                                images=all_images, examples=examples, recipe_yaml=recipe_yaml),
                    encoding="utf-8")
    return path

