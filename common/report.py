"""A short markdown report of one evaluation (system, data, metrics table, timing).

`write_report(result, path, extra)` is the one entry point; richer formats (HTML, plots) can be
added beside it without touching the evaluation code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_report(result, extra: Mapping[str, object] | None = None) -> str:
    """Markdown text for an EvalResult-like object (needs .metrics and .info dicts)."""
    info = dict(result.info)
    extra = dict(extra or {})
    system = info.get("model", info.get("system", "?"))
    lines = [f"# Evaluation: {system} on {info.get('data', '?')} ({info.get('split', '?')})", ""]
    about = [
        ("system", info.get("system")),
        ("model", info.get("model")),
        ("data", info.get("data")),
        ("split", info.get("split")),
        ("mode", info.get("mode")),
        ("queries / documents", f"{info.get('n_queries')} / {info.get('n_docs')}"),
        ("retrieval depth k", info.get("k")),
        ("index", info.get("index")),
        ("similarity", info.get("similarity")),
    ]
    about += list(extra.items())
    for key, value in about:
        if value is not None:
            lines.append(f"- **{key}**: {_fmt(value)}")
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in result.metrics.items()]
    timing = info.get("timing") or {}
    if timing:
        lines += ["", "| timing | value |", "| --- | --- |"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in timing.items()]
    lines += [
        "",
        "Metrics by ir_measures (pytrec_eval; MRR@10 by the MS MARCO code), averaged over all "
        "judged queries; a judged query without retrieved documents counts 0.",
        "",
    ]
    return "\n".join(lines)


def write_report(result, path: str | Path, extra: Mapping[str, object] | None = None) -> Path:
    """Write the markdown report of `result` to `path`; `extra` adds key/value lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result, extra))
    return path
