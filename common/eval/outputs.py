"""The outputs of one evaluation: run.trec, metrics.json, report.md and report.html.

`write_outputs(result, dir)` writes them all; `write_report` is the short markdown report (system,
data, metrics table, timing); the HTML page with plots and best/worst queries comes from
common/eval/html.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping

from twotower.common.data import write_run
from twotower.common.eval.html import eval_examples, examples_markdown, write_eval_html

OUTPUTS = {"run": "run.trec", "metrics": "metrics.json", "report": "report.md",
           "html": "report.html"}
OUTPUT_FILES = tuple(OUTPUTS.values())


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


def existing_outputs(output_dir: str | Path) -> list[str]:
    return [name for name in OUTPUT_FILES if (Path(output_dir) / name).exists()]


def write_outputs(result, output_dir: str | Path, overwrite: bool = False,
                  extra: Mapping[str, Any] | None = None, data=None,
                  recipe_yaml: str | None = None) -> Dict[str, Path]:
    """Write run.trec, metrics.json, report.md and report.html; refuse to replace existing ones
    unless `overwrite`. With `data` (the evaluated RetrievalData) both reports also show the best
    and worst queries with their retrieved passages."""
    output_dir = Path(output_dir)
    clash = set(extra or {}) & (set(result.info) | {"metrics"})
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would replace result fields")
    found = existing_outputs(output_dir)
    if found and not overwrite:
        raise FileExistsError(f"{output_dir} already has {', '.join(found)}; pass --overwrite "
                              "(overwrite=True) to replace them, or choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: output_dir / name for key, name in OUTPUTS.items()}
    write_run(result.run, paths["run"], tag=re.sub(r"\s+", "_", str(result.info.get("model"))))
    summary = {"metrics": result.metrics, **result.info, **dict(extra or {})}
    paths["metrics"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_report(result, paths["report"], extra)
    examples = eval_examples(result, data) if data is not None else None
    if examples is not None:
        with paths["report"].open("a", encoding="utf-8") as f:
            f.write(examples_markdown(examples))
    write_eval_html(result, paths["html"], examples=examples, extra=extra, recipe_yaml=recipe_yaml)
    return paths
