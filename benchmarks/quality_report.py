"""quality.md from the rows of benchmarks/quality.py: p-values (common/significance.py) and the
tables. A row is {"nDCG@10", "R@100", "wall_s", "cpu_s", "run_file", ...}; a row with a
`base` (another row's name) is compared with that row on the queries of `qrels` (a
[data, split] pair: the dev queries of an ablation, the held-out queries of another corpus)."""
from __future__ import annotations

from pathlib import Path

MEASURES = ["nDCG@10", "R@100"]

# every test-split row is compared with these (whichever have a run file): the zero-shot
# baselines, and the labelled-data run that domain_adapt must beat; row name -> column title
REFERENCES = {"BM25": "p vs BM25", "start model": "p vs start", "fewshot (seed 0)": "p vs fewshot"}
# rows compared with a base row, shown in tables of their own: name prefix -> table title
BASE_TABLES = {
    "ablation, ": "Ablation (dev split, one seed; each change against its base row)",
    "other corpus, ": "The same recipes on another corpus (held-out queries; against the start "
                      "model)",
}


def _p_key(reference: str) -> str:
    return f"p_vs_{reference.replace(' ', '_')}"


def _against_base(rows: dict) -> None:
    from common.data import load_run
    from common.evaluate import load_eval_data
    from common.metrics import per_query
    from common.significance import compare_paired

    qrels_of: dict = {}
    for row in rows.values():
        base = rows.get(row.get("base") or "", {})
        if not (Path(row.get("run_file", "")).is_file() and Path(base.get("run_file", "")).is_file()):
            continue
        key = tuple(row["qrels"])
        qrels_of[key] = qrels_of.get(key) or load_eval_data(*key).qrels
        run, base_run = load_run(row["run_file"]), load_run(base["run_file"])
        if set(run) != set(base_run):
            raise SystemExit(f"{row['run_file']} and {base['run_file']} rank different queries: "
                             "not the same held-out split")
        judged = {q: qrels_of[key][q] for q in base_run}
        test = compare_paired(per_query(judged, run, ["nDCG@10"])["nDCG@10"],
                              per_query(judged, base_run, ["nDCG@10"])["nDCG@10"])
        row["p_vs_base"] = round(test.p_randomization, 4)
        row["delta_vs_base"] = round(test.mean_a - test.mean_b, 4)


def significance(rows: dict, data: str) -> None:
    """p-values of each test-split run's per-query nDCG@10 against each of REFERENCES, and of
    each row with a `base` against that base."""
    from common.data import load_run
    from common.evaluate import load_eval_data
    from common.metrics import per_query
    from common.significance import compare_paired

    _against_base(rows)
    qrels = load_eval_data(data, "test").qrels
    scores = {}
    for name, row in rows.items():
        path = Path(row.get("run_file", ""))
        if path.is_file() and not name.startswith("dev:") and "qrels" not in row:
            scores[name] = per_query(qrels, load_run(path), ["nDCG@10"])["nDCG@10"]
    for name, row in rows.items():
        for ref in REFERENCES:
            if name in scores and ref in scores and name != ref:
                test = compare_paired(scores[name], scores[ref])
                row[_p_key(ref)] = round(test.p_randomization, 4)


def seed_means(rows: dict, data: str) -> dict:
    """Rows sharing a `group` (one per seed or few-shot sample), test split only: the mean and
    spread of each measure, and p-values of the per-query nDCG@10 averaged over the seeds against
    each of REFERENCES (a reference that is itself a group is averaged the same way)."""
    import statistics

    from common.data import load_run
    from common.evaluate import load_eval_data
    from common.metrics import per_query
    from common.significance import compare_paired

    groups: dict = {}
    for name, row in rows.items():
        if row.get("group") and "qrels" not in row and not name.startswith("dev:"):
            groups.setdefault(row["group"], {})[row["seed"]] = name
    qrels = load_eval_data(data, "test").qrels if groups else {}

    averaged: dict = {}  # tuple of row names -> per-query mean (a reference serves many groups)

    def scores(names: list) -> dict | None:
        key = tuple(names)
        if key not in averaged:
            paths = [Path(rows[n].get("run_file", "")) for n in names]
            runs = ([per_query(qrels, load_run(p), ["nDCG@10"])["nDCG@10"] for p in paths]
                    if all(p.is_file() for p in paths) else None)
            averaged[key] = runs and {q: statistics.fmean(r[q] for r in runs) for q in runs[0]}
        return averaged[key]

    means = {}
    for group, by_seed in groups.items():
        names = [by_seed[s] for s in sorted(by_seed)]
        values = {m: [rows[n][m] for n in names] for m in MEASURES if
                  all(isinstance(rows[n].get(m), (int, float)) for n in names)}
        entry = {"seeds": sorted(by_seed), **{m: round(statistics.fmean(v), 4) for m, v in values.items()},
                 "nDCG@10_sd": round(statistics.stdev(values["nDCG@10"]), 4) if len(names) > 1 else None,
                 "nDCG@10_runs": values.get("nDCG@10"),
                 "wall_s": (statistics.fmean(rows[n]["wall_s"] for n in names)
                            if all(rows[n].get("wall_s") for n in names) else None)}
        mine = scores(names)
        for ref in REFERENCES:
            ref_group = rows.get(ref, {}).get("group")
            ref_names = ([groups[ref_group][x] for x in sorted(groups[ref_group])]
                         if ref_group in groups else [ref] if ref in rows else [])
            if mine is None or not ref_names or ref_group == group:
                continue
            theirs = scores(ref_names)
            if theirs is not None:
                entry[_p_key(ref)] = round(compare_paired(mine, theirs).p_randomization, 4)
        means[group] = entry
    return means


def _fmt(row: dict, key: str, spec: str = ".4f") -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "-"


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
    lines += ["", "p: two-sided randomisation test on per-query nDCG@10 (common/significance.py). "
              "Rows starting with 'dev:' are on the dev split (100 held-out training queries)."]
    if means:
        lines += ["", "## Mean over seeds (test split)", "",
                  "| runs | seeds | nDCG@10 mean | sd | per seed | R@100 mean | "
                  + " | ".join(REFERENCES.values()) + " | wall s (mean) |",
                  "|---" * (6 + len(REFERENCES)) + "|"]
        for group, m in means.items():
            per_seed = ", ".join(f"{v:.4f}" for v in m.get("nDCG@10_runs") or [])
            lines.append(f"| {group} | {', '.join(map(str, m['seeds']))} | " + " | ".join([
                _fmt(m, "nDCG@10"), _fmt(m, "nDCG@10_sd"), per_seed, _fmt(m, "R@100"),
                *(_fmt(m, _p_key(ref)) for ref in REFERENCES), _fmt(m, "wall_s", ".0f")]) + " |")
        lines += ["", "p of a mean: the per-query nDCG@10 averaged over the seeds (a reference "
                  "with seeds of its own averaged the same way), randomisation test."]
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
