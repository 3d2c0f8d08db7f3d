"""Compare runs: a metric table per dataset and on average, paired significance, a bar chart.

CLI:  python -m twotower.common.report.compare bm25=runs/eval/bm25-scifact-test minilm=runs/eval/all-MiniLM-L6-v2-scifact-test
      python -m twotower.common.report.compare bm25.trec other.trec --data scifact --split test
Each RUN is [LABEL=]PATH; PATH is
  - an output folder of `python -m twotower.common.eval.evaluate` (metrics.json + run.trec): scored against the
    qrels of the data it names (metrics.json `data_path`/`data` and `split`), or --qrels/--data;
  - a folder holding such folders (one run of one system on several datasets);
  - a TREC run file of any system (BM25, outside models): scored against --qrels or --data;
  - a folder with metrics.json only: shown in the table, without significance.
The first RUN (or --baseline LABEL) is the baseline: every other run is tested against it per
dataset and measure, on per-query values from twotower.common.eval.metrics.per_query, with a paired t-test (*)
and a randomisation test (†), marked when p < --alpha (common/eval/significance.py). The average
column is the mean over the datasets every run has; it is not tested (queries of different
datasets are not paired). Writes compare.md, compare.json and compare.png to --output-dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence

from twotower.common.data import load_qrels, load_run, resolve_data
from twotower.common.eval.evaluate import load_eval_data
from twotower.common.eval.metrics import per_query, resolve_measures
from twotower.common.eval.significance import PairedResult, SignificanceArgs, compare_paired
from twotower.common.report.plots import plot_compare_bars

logger = logging.getLogger("twotower.common.report.compare")
DEFAULT_COMPARE_MEASURES = ("nDCG@10", "MRR@10", "R@100")
MARK_TTEST, MARK_RANDOMIZATION = "*", "†"
AVERAGE = "average"


@dataclass
class RunEntry:
    """One system's result on one dataset."""

    label: str
    dataset: str  # e.g. "scifact/test"
    source: Path
    stored_metrics: dict[str, float] = field(default_factory=dict)
    run_file: Path | None = None
    data_path: str | None = None  # where the qrels come from unless --qrels/--data
    split: str = "test"
    subsampled: bool = False  # evaluated on --max-queries: score only the queries it ran


@dataclass
class Comparison:
    labels: list[str]
    datasets: list[str]
    measures: list[str]
    baseline: str
    values: dict[str, dict[str, dict[str, float]]]  # label -> dataset -> measure -> mean
    tests: dict[str, dict[str, dict[str, PairedResult]]]  # label -> dataset -> measure
    alpha: float = 0.05

    def common_datasets(self) -> list[str]:
        return [d for d in self.datasets if all(d in self.values[l] for l in self.labels)]

    def average(self, label: str, measure: str) -> float | None:
        shared = self.common_datasets()
        vals = [self.values[label][d].get(measure) for d in shared]
        return sum(vals) / len(vals) if shared and None not in vals else None

    def marks(self, label: str, dataset: str, measure: str) -> str:
        test = self.tests.get(label, {}).get(dataset, {}).get(measure)
        if test is None:
            return ""
        return ((MARK_TTEST if test.p_ttest < self.alpha else "")
                + (MARK_RANDOMIZATION if test.p_randomization < self.alpha else ""))


# ------------------------------------------------------------------------------ discovery
def parse_run_spec(spec: str) -> tuple[str, Path]:
    """`LABEL=PATH` or `PATH` (label = the file or folder name)."""
    label, sep, path = spec.partition("=")
    if sep and label and not Path(spec).exists():
        return label, Path(path)
    return Path(spec).name.removesuffix(".trec"), Path(spec)


def _eval_dir_entry(label: str, folder: Path) -> RunEntry:
    metrics_file = folder / "metrics.json"
    try:
        summary = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_file}:{err.lineno}: not valid JSON ({err.msg})") from None
    # twotower.common.eval.evaluate writes {"metrics": {...}, "data": ..., "split": ...}; a training run's
    # metrics.json is a flat {measure: value}
    stored = summary.get("metrics", summary) if isinstance(summary, dict) else {}
    stored = {k: float(v) for k, v in stored.items() if isinstance(v, (int, float))}
    name, split = summary.get("data"), summary.get("split", "test")
    run_file = folder / "run.trec"
    return RunEntry(label=label, dataset=f"{name}/{split}" if name else folder.name,
                    source=folder, stored_metrics=stored,
                    run_file=run_file if run_file.is_file() else None,
                    data_path=summary.get("data_path") or name, split=split,
                    subsampled=bool(summary.get("max_queries")))


def discover(label: str, path: Path) -> list[RunEntry]:
    """The entries one RUN argument stands for (see the module docstring)."""
    if path.is_file():
        if path.name == "metrics.json":
            return [_eval_dir_entry(label, path.parent)]
        return [RunEntry(label=label, dataset="", source=path, run_file=path)]
    if not path.is_dir():
        raise FileNotFoundError(f"run '{path}' does not exist")
    if (path / "metrics.json").is_file():
        return [_eval_dir_entry(label, path)]
    found = [_eval_dir_entry(label, sub) for sub in sorted(path.iterdir())
             if (sub / "metrics.json").is_file()]
    if not found:
        raise FileNotFoundError(f"'{path}' has no metrics.json, nor sub-folders with one: not an "
                                "evaluation output of python -m twotower.common.eval.evaluate")
    return found


# -------------------------------------------------------------------------------- scoring
class QrelsSource:
    """Qrels per dataset: one given file/data set for everything, or each run's own data."""

    def __init__(self, qrels_file: str | None = None, data: str | None = None,
                 split: str = "test"):
        self.qrels_file, self.data, self.split = qrels_file, data, split
        self._cache: dict[tuple, dict] = {}

    @property
    def given(self) -> bool:
        return bool(self.qrels_file or self.data)

    def dataset_name(self) -> str:
        if self.qrels_file:
            p = Path(self.qrels_file)
            stem = p.name.split(".")[0]
            return f"{p.parent.parent.name}/{stem}" if p.parent.name == "qrels" else stem

        return f"{resolve_data(self.data).name}/{self.split}"

    def qrels_for(self, entry: RunEntry) -> dict[str, dict[str, int]]:
        if self.qrels_file:
            key: tuple = ("file", self.qrels_file)
        elif self.data:
            key = ("data", self.data, self.split)
        elif entry.data_path:
            key = ("data", entry.data_path, entry.split)
        else:
            raise ValueError(f"{entry.source}: cannot tell which qrels score this run; pass "
                             "--qrels FILE or --data NAME [--split SPLIT]")
        if key not in self._cache:
            self._cache[key] = (load_qrels(key[1]) if key[0] == "file"
                                else load_eval_data(key[1], key[2]).qrels)
        return self._cache[key]


def score_entry(entry: RunEntry, measures: Sequence[str], qrels_source: QrelsSource
                ) -> tuple[dict[str, float], dict[str, dict[str, float]] | None]:
    """(mean per measure, per-query values or None without a run file)."""
    if entry.run_file is None:
        missing = [m for m in measures if m not in entry.stored_metrics]
        if missing:
            logger.warning("%s: metrics.json has no %s and there is no run.trec to compute them",
                           entry.source, ", ".join(missing))
        return {m: entry.stored_metrics[m] for m in measures if m in entry.stored_metrics}, None

    run = load_run(entry.run_file)
    qrels = qrels_source.qrels_for(entry)
    if entry.subsampled:  # evaluated on a query sample: the other judged queries were not run
        qrels = {q: docs for q, docs in qrels.items() if q in run}
    values = per_query(qrels, run, measures)
    means = {m: sum(v.values()) / len(v) for m, v in values.items()}
    for m, mean in means.items():
        if m in entry.stored_metrics and abs(entry.stored_metrics[m] - mean) > 1e-6:
            logger.warning("%s: %s recomputed from run.trec is %.6f but metrics.json says %.6f "
                           "(different qrels?)", entry.source, m, mean, entry.stored_metrics[m])
    return means, values


def build_comparison(entries: Sequence[RunEntry], measures: Sequence[str] | None = None,
                     qrels_source: QrelsSource | None = None, baseline: str | None = None,
                     significance: SignificanceArgs | None = None) -> Comparison:
    """Score every entry and test every non-baseline run against the baseline per dataset."""
    qrels_source = qrels_source or QrelsSource()
    significance = significance or SignificanceArgs()
    names = list(resolve_measures(measures or DEFAULT_COMPARE_MEASURES))
    labels = list(dict.fromkeys(e.label for e in entries))
    baseline = baseline or labels[0]
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not one of the runs ({', '.join(labels)})")
    values: dict = {l: {} for l in labels}
    per_q: dict = {l: {} for l in labels}
    if qrels_source.given:  # one set of qrels scores every run: they must share one dataset
        named = sorted({e.dataset for e in entries if e.dataset})
        if len(named) > 1:
            raise ValueError(f"--qrels/--data score every run, but the runs are on several "
                             f"datasets ({', '.join(named)}); leave them out to use each run's "
                             "own data")
        for entry in entries:
            entry.dataset = named[0] if named else qrels_source.dataset_name()
    for entry in entries:
        if not entry.dataset:  # a bare TREC run file
            raise ValueError(f"{entry.source} is a TREC run file: pass --qrels FILE or "
                             "--data NAME [--split SPLIT] to score it")
        if entry.dataset in values[entry.label]:
            raise ValueError(f"run {entry.label!r} has two results for {entry.dataset} "
                             f"(second: {entry.source})")
        values[entry.label][entry.dataset], per_q[entry.label][entry.dataset] = score_entry(
            entry, names, qrels_source)
    datasets = list(dict.fromkeys(e.dataset for e in entries))
    tests: dict = {l: {} for l in labels if l != baseline}
    for label in tests:
        for dataset in datasets:
            base, other = per_q[baseline].get(dataset), per_q[label].get(dataset)
            if base is None or other is None:
                continue
            tests[label][dataset] = {}
            for m in names:
                try:
                    tests[label][dataset][m] = compare_paired(base[m], other[m], significance,
                                                              (baseline, label))
                except ValueError as err:
                    logger.warning("%s vs %s on %s: no test: %s", label, baseline, dataset, err)
    return Comparison(labels, datasets, names, baseline, values, tests, significance.alpha)


# -------------------------------------------------------------------------------- output
def render_markdown(comp: Comparison) -> str:
    columns = comp.datasets + ([AVERAGE] if len(comp.datasets) > 1 else [])
    lines: list[str] = []
    for m in comp.measures:
        lines += [f"### {m}", "", "| run | " + " | ".join(columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for label in comp.labels:
            cells = []
            for d in columns:
                v = (comp.average(label, m) if d == AVERAGE
                     else comp.values[label].get(d, {}).get(m))
                marks = comp.marks(label, d, m).replace("*", "\\*")  # not markdown emphasis
                cells.append("–" if v is None else f"{v:.4f}{marks}")
            name = f"{label} (baseline)" if label == comp.baseline else label
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Marks: `{MARK_TTEST}` paired t-test, `{MARK_RANDOMIZATION}` paired randomisation "
              f"test, p < {comp.alpha} against {comp.baseline} on the same queries. "
              + (f"The average is over {', '.join(comp.common_datasets())}."
                 if len(comp.datasets) > 1 else ""), ""]
    rows = [(label, d, m, t) for label, by_d in comp.tests.items() for d, by_m in by_d.items()
            for m, t in by_m.items()]
    if rows:
        lines += ["| run | dataset | measure | queries | difference | p (t-test) | "
                  "p (randomisation) |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {l} | {d} | {m} | {t.n_queries} | {t.difference:+.4f} | {t.p_ttest:.4g} | "
                  f"{t.p_randomization:.4g} |" for l, d, m, t in rows]
    return "\n".join(lines) + "\n"


def to_json(comp: Comparison) -> dict:
    return {"baseline": comp.baseline, "alpha": comp.alpha, "measures": comp.measures,
            "datasets": comp.datasets, "values": comp.values,
            "average": {l: {m: comp.average(l, m) for m in comp.measures} for l in comp.labels},
            "tests": {l: {d: {m: t.to_json() for m, t in by_m.items()} for d, by_m in by_d.items()}
                      for l, by_d in comp.tests.items()}}


def bar_chart(comp: Comparison, measure: str | None = None) -> bytes:
    measure = measure or comp.measures[0]
    values: Dict[str, Dict[str, float]] = {}
    marks: Dict[str, Dict[str, str]] = {}
    for label in comp.labels:
        values[label] = {d: comp.values[label][d][measure] for d in comp.datasets
                         if measure in comp.values[label].get(d, {})}
        marks[label] = {d: comp.marks(label, d, measure) for d in comp.datasets}
        if len(comp.datasets) > 1 and comp.average(label, measure) is not None:
            values[label][AVERAGE] = comp.average(label, measure)
    note = (f"{MARK_TTEST} paired t-test, {MARK_RANDOMIZATION} randomisation test: "
            f"p < {comp.alpha} vs {comp.baseline}") if len(comp.labels) > 1 else None
    return plot_compare_bars(values, measure, marks, note)


def write_comparison(comp: Comparison, output_dir: str | Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": output_dir / "compare.md", "json": output_dir / "compare.json",
             "png": output_dir / "compare.png"}
    paths["md"].write_text(render_markdown(comp), encoding="utf-8")
    paths["json"].write_text(json.dumps(to_json(comp), indent=2) + "\n")
    paths["png"].write_bytes(bar_chart(comp))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower.common.report.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help="[LABEL=]PATH (see above)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--qrels", help="qrels file for every run (TREC or BEIR layout)")
    src.add_argument("--data", help="data name or folder whose qrels score every run")
    p.add_argument("--split", default="test", help="split of --data")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_COMPARE_MEASURES))
    p.add_argument("--baseline", help="label of the baseline run (default: the first)")
    p.add_argument("--permutations", type=int, default=SignificanceArgs.n_permutations)
    p.add_argument("--seed", type=int, default=SignificanceArgs.seed)
    p.add_argument("--alpha", type=float, default=SignificanceArgs.alpha)
    p.add_argument("--output-dir", default="runs/compare", help="compare.md/.json/.png go here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if len(ns.runs) < 2:
        parser.error("give at least two runs to compare")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU variant
    entries: list[RunEntry] = []
    for spec in ns.runs:
        entries += discover(*parse_run_spec(spec))
    comp = build_comparison(entries, ns.metrics, QrelsSource(ns.qrels, ns.data, ns.split),
                            ns.baseline, SignificanceArgs(ns.permutations, ns.seed, ns.alpha))
    paths = write_comparison(comp, ns.output_dir)
    print(render_markdown(comp))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
