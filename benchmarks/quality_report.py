"""quality.md from the recorded rows of benchmarks/quality.py: p-values (common/eval/significance.py)
and the tables. A row is {"nDCG@10", "R@100", "wall_s", "cpu_s", "run_file", "per_query", ...}
(per_query: its per-query nDCG@10, recorded once computed from the run file); a row with a
`base` (another row's name) is compared with that row on the queries of `qrels` (a
[data, split] pair: the dev queries of an ablation, the held-out queries of another corpus)."""
from __future__ import annotations

import statistics
from pathlib import Path

from twotower.common.data import load_run
from twotower.common.eval.evaluate import load_eval_data
from twotower.common.eval.metrics import per_query
from twotower.common.eval.significance import compare_paired

MEASURES = ["nDCG@10", "R@100"]

# every test-split row is compared with these (whichever have a run file): the zero-shot
# baselines, the labelled-data run that domain_adapt must beat, and sentence-transformers'
# trainer on the same triples that the few-shot runs must beat; row name -> column title
REFERENCES = {"BM25": "p vs BM25", "start model": "p vs start", "fewshot (seed 0)": "p vs fewshot",
              "sentence-transformers MNRL, same triples (seed 0)": "p vs ST"}
# rows compared with a base row, shown in tables of their own: name prefix -> table title
BASE_TABLES = {
    "ablation, ": "Ablation (dev split, each seed; each change against its base row of the same "
                  "seed)",
    "other corpus, ": "The same recipes on another corpus (held-out queries; against the start "
                      "model)",
}


def _p_key(reference: str) -> str:
    return f"p_vs_{reference.replace(' ', '_')}"


class _Scores:
    """Per-query nDCG@10 of rows' runs, averaged over several rows, on the queries of a row's
    `qrels` (a dev split: the queries its run ranks) or on the test split of `data`."""

    def __init__(self, rows: dict, data: str):
        self.rows, self.data, self.qrels, self.cache = rows, data, {}, {}

    def per_query(self, name: str) -> dict | None:
        """Row `name`'s per-query nDCG@10, kept in the row (so in quality.json: p-values outlive
        runs/, which a fresh checkout lacks), computed from its run file the first time."""
        row = self.rows[name]
        if "per_query" not in row:
            path, held_out = Path(row.get("run_file", "")), row.get("qrels")
            if not path.is_file():
                return None
            split = tuple(held_out or (self.data, "test"))
            if split not in self.qrels:
                self.qrels[split] = load_eval_data(*split).qrels
            run = load_run(path)
            qrels = {q: self.qrels[split][q] for q in run} if held_out else self.qrels[split]
            row["per_query"] = per_query(qrels, run, ["nDCG@10"])["nDCG@10"]
        return row["per_query"]

    def __call__(self, names: list) -> dict | None:
        if tuple(names) not in self.cache:
            per = [self.per_query(n) for n in names]
            per = None if None in per else per
            if per and any(set(p) != set(per[0]) for p in per):
                raise SystemExit(f"{', '.join(names)} rank different queries")
            self.cache[tuple(names)] = per and {q: statistics.fmean(p[q] for p in per)
                                                for q in per[0]}
        return self.cache[tuple(names)]

    def compare(self, names: list, others: list):
        mine = self(names) if others else None
        theirs = self(others) if mine is not None else None
        if mine and theirs and set(mine) != set(theirs):
            raise SystemExit(f"{names[0]} and {others[0]} rank different queries: not the same "
                             "held-out split")
        return compare_paired(mine, theirs) if mine and theirs else None


def _on_test(name: str, row: dict) -> bool:
    return not name.startswith("dev:") and "qrels" not in row


def significance(rows: dict, data: str) -> None:
    """Each test-split row's per-query nDCG@10 against each of REFERENCES, and each row with a
    `base` against that base, on its own queries."""
    scores = _Scores(rows, data)
    for name, row in rows.items():
        test = scores.compare([name], [row["base"]]) if row.get("base") in rows else None
        if test:
            row["p_vs_base"] = round(test.p_randomization, 4)
            row["delta_vs_base"] = round(test.mean_a - test.mean_b, 4)
        for ref in REFERENCES if _on_test(name, row) else ():
            test = (scores.compare([name], [ref]) if ref != name and ref in rows
                    and _on_test(ref, rows[ref]) else None)
            if test:
                row[_p_key(ref)] = round(test.p_randomization, 4)


def _compared(entry: dict, earlier: dict, keys: tuple, test, rows: dict, mine, theirs) -> None:
    """Record a mean's p-value (`keys`: its key and what goes with it) with what it compared: the
    nDCG@10 of each run on either side. Without `test` (a row recorded before rows kept their
    per-query scores, whose run file is gone with runs/), the `earlier` entry's value is kept if it
    compared the same runs; a re-run changes its row's nDCG@10, and then no p-value is shown until
    it can be computed."""
    basis = [[rows[n].get("nDCG@10") for n in mine], [rows[n].get("nDCG@10") for n in theirs]]
    if test is not None:
        entry[keys[0]] = round(test.p_randomization, 4)
        if len(keys) > 1:
            entry[keys[1]] = round(test.mean_a - test.mean_b, 4)
    elif earlier.get("compared", {}).get(keys[0]) == basis and keys[0] in earlier:
        entry.update({k: earlier[k] for k in keys if k in earlier})
    else:
        return
    entry.setdefault("compared", {})[keys[0]] = basis


def seed_means(rows: dict, data: str, earlier: dict | None = None) -> dict:
    """Rows sharing a `group` (one per seed or few-shot sample): mean and spread of each measure,
    and p-values of the per-query nDCG@10 averaged over the seeds. A test-split group against
    each of REFERENCES (a reference that is a group averaged the same way); a group of rows with
    a `base` (two seeds or more) against its base rows' group over the same seeds. `earlier`:
    the means recorded before, whose p-values stand where the run files are gone (_compared)."""
    groups: dict = {}
    for name, row in rows.items():
        if row.get("group") and ("qrels" in row or not name.startswith("dev:")):
            groups.setdefault(row["group"], {})[row["seed"]] = name
    scores, means, before = _Scores(rows, data), {}, earlier or {}
    for group, by_seed in groups.items():
        names = [by_seed[s] for s in sorted(by_seed)]
        first = rows[names[0]]
        if "qrels" in first and len(names) < 2:
            continue  # one seed: the per-seed ablation table says it all
        values = {m: [rows[n][m] for n in names] for m in MEASURES
                  if all(isinstance(rows[n].get(m), (int, float)) for n in names)}
        entry = means[group] = {
            "seeds": sorted(by_seed), **{m: round(statistics.fmean(v), 4) for m, v in values.items()},
            "nDCG@10_sd": round(statistics.stdev(values["nDCG@10"]), 4) if len(names) > 1 else None,
            "nDCG@10_runs": values.get("nDCG@10"),
            "wall_s": (statistics.fmean(rows[n]["wall_s"] for n in names)
                       if all(rows[n].get("wall_s") for n in names) else None)}
        if "qrels" in first:
            entry["qrels"] = first["qrels"]
            base_group = rows.get(first.get("base") or "", {}).get("group")
            base_of = groups.get(base_group, {})
            if base_group:
                entry["base"] = base_group
            if base_group and all(s in base_of for s in by_seed):
                theirs = [base_of[s] for s in sorted(by_seed)]
                _compared(entry, before.get(group, {}), ("p_vs_base", "delta_vs_base"),
                          scores.compare(names, theirs), rows, names, theirs)
            continue
        for ref in REFERENCES:
            ref_group = rows.get(ref, {}).get("group")
            ref_names = ([groups[ref_group][s] for s in sorted(groups[ref_group])]
                         if ref_group in groups else [ref] if ref in rows else [])
            if ref_names and ref_group != group:
                _compared(entry, before.get(group, {}), (_p_key(ref),),
                          scores.compare(names, ref_names), rows, names, ref_names)
    return means


def _fmt(row: dict, key: str, spec: str = ".4f") -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _per_seed(mean: dict) -> str:
    return ", ".join(f"{v:.4f}" for v in mean.get("nDCG@10_runs") or [])


def markdown(rows: dict, means: dict | None = None) -> str:
    lines = ["# Domain adaptation on SciFact (benchmarks/quality.py)", "",
             "| run | nDCG@10 | R@100 | " + " | ".join(REFERENCES.values()) + " | wall s | CPU s |",
             "|---" * (5 + len(REFERENCES)) + "|"]
    for name, r in rows.items():
        if not name.startswith(tuple(BASE_TABLES)):
            cells = [_fmt(r, "nDCG@10"), _fmt(r, "R@100"),
                     *(_fmt(r, _p_key(ref)) for ref in REFERENCES),
                     _fmt(r, "wall_s", ".0f"), _fmt(r, "cpu_s", ".0f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "p: two-sided randomisation test on per-query nDCG@10 (common/eval/significance.py). "
              "Rows starting with 'dev:' are on the dev split (100 held-out training queries)."]
    test_means = {g: m for g, m in (means or {}).items() if "qrels" not in m}
    if test_means:
        lines += ["", "## Mean over seeds (test split)", "",
                  "| runs | seeds | nDCG@10 mean | sd | per seed | R@100 mean | "
                  + " | ".join(REFERENCES.values()) + " | wall s (mean) |",
                  "|---" * (6 + len(REFERENCES)) + "|"]
        for group, m in test_means.items():
            lines.append(f"| {group} | {', '.join(map(str, m['seeds']))} | " + " | ".join([
                _fmt(m, "nDCG@10"), _fmt(m, "nDCG@10_sd"), _per_seed(m), _fmt(m, "R@100"),
                *(_fmt(m, _p_key(ref)) for ref in REFERENCES), _fmt(m, "wall_s", ".0f")]) + " |")
        lines += ["", "p of a mean: the per-query nDCG@10 averaged over the seeds (a reference "
                  "with seeds of its own averaged the same way), randomisation test."]
    base_means = {g: m for g, m in (means or {}).items() if "qrels" in m}
    if base_means:
        lines += ["", "## Ablation, mean over seeds (dev split)", "",
                  "| run | seeds | nDCG@10 mean | sd | per seed | Δ vs base | p vs base | "
                  "wall s (mean) |", "|---" * 8 + "|"]
        lines += [f"| {group.removeprefix('ablation, ')} | {', '.join(map(str, m['seeds']))} | "
                  + " | ".join([_fmt(m, "nDCG@10"), _fmt(m, "nDCG@10_sd"), _per_seed(m),
                                _fmt(m, "delta_vs_base", "+.4f"), _fmt(m, "p_vs_base"),
                                _fmt(m, "wall_s", ".0f")]) + " |"
                  for group, m in base_means.items()]
        lines += ["", "Δ and p: the per-query nDCG@10 averaged over the seeds against the base "
                  "row's, averaged over the same seeds. The dev corpus slice (the held-out "
                  "queries' documents plus 2,000 others) is sampled with the training seed, so "
                  "the spread over seeds includes the slice's."]
    for prefix, title in BASE_TABLES.items():
        table = {n.removeprefix(prefix): r for n, r in rows.items() if n.startswith(prefix)}
        if table:
            lines += ["", f"## {title}", "",
                      "| run | nDCG@10 | R@100 | Δ vs base | p vs base | wall s | CPU s |",
                      "|---" * 7 + "|"]
            lines += [f"| {name} | " + " | ".join([
                _fmt(r, "nDCG@10"), _fmt(r, "R@100"), _fmt(r, "delta_vs_base", "+.4f"),
                _fmt(r, "p_vs_base"), _fmt(r, "wall_s", ".0f"), _fmt(r, "cpu_s", ".0f")]) + " |"
                for name, r in table.items()]
    return "\n".join(lines) + "\n"
