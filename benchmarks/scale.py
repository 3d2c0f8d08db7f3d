"""How the data path grows with the collection: MS MARCO-shaped data at 0.1 M, 1 M, 8.8 M passages.

    TWOTOWER_DATA=../shared/data python -m benchmarks.scale [--sizes 100000 1000000 8841823]
        [--parts data train bm25 search random_search stream] [--tokens 10000000 100000000]
        [--work /tmp/twotower-scale]

Data: benchmarks/scale_data.py (what it imitates is said there), written once per size under
--work. Every measurement runs in a child process, watched every 0.2 s: wall seconds, the peak
RSS of its largest process, the peak total PSS of its processes (a page shared by two processes
counts half in each), the peak total USS (pages no other process maps: a file mapped by one
process alone counts too) and the peak total anonymous RSS (RssAnon: heap and other memory that
is the process's own, never a mapped file: what the process copied). Parts:
  data           cold (empty datasets cache) and warm: read the collection, the training queries,
                 qrels and hard negatives into cached Arrow tables and their id indexes;
  train          finetune/run.py --recipe msmarco_mnrl_cpu on the data with a tiny random BERT (the
                 data path is measured, not the model): 1 step cold and warm, on 1 and 2
                 processes (gloo), then 101 steps warm (steps/s = 100 / the difference);
  teacher        cross-encoder scores of every training pair as the public pickle (~50 M at full
                 size): the cached table built (cold) and reopened (warm), every query's scores
                 read;
  teacher_train  the first training step with msmarco_mnrl's teacher margin (3.0, 5 negatives per
                 system) on 1 process, the scores' table built in the run (cold), then reused;
  bm25           BM25 index of the collection built (and saved), then read back (memory-mapped)
                 and the top-20 of 10k training queries searched;
  search         the tiny encoder encodes the collection into fp16 shards, exact top-100 of 1k dev
                 queries streamed shard by shard (twotower.common.eval.shards);
  random_search  the same search over random 768-dim fp16 vectors, one per passage;
  stream         (--tokens, not --sizes) pretraining's token stream of a Wikipedia-like corpus of
                 that many tokens, cold (tokenised, written) and warm (mapped), 10k chunks read.
Results: scale.json and scale.md in benchmarks/results (merged per size and part); each row
also shows its growth over the previous size (x prev).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.rehearse import launch_prefix
from benchmarks.scale_data import (WORDPIECES, write_msmarco, write_pretraining_corpus,
                                   write_teacher_scores)
from benchmarks.synthetic_data import _minilm_path as _minilm
from benchmarks.synthetic_data import write_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PARTS = ("data", "train", "teacher", "teacher_train", "bm25", "search", "random_search", "stream")


def watch(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd`, sampling its process tree: wall s, peak RSS of one process, peak total PSS."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_rss = peak_pss = peak_uss = peak_anon = 0
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            pss = uss = anon = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    info = p.memory_full_info()
                    peak_rss, pss, uss = max(peak_rss, info.rss), pss + info.pss, uss + info.uss
                    anon += rss_anon(p.pid)
            except (psutil.Error, OSError):
                pass
            peak_pss, peak_uss = max(peak_pss, pss), max(peak_uss, uss)
            peak_anon = max(peak_anon, anon)
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return {"s": round(time.time() - start, 1), "rss_gb": round(peak_rss / 2**30, 2),
            "pss_gb": round(peak_pss / 2**30, 2), "uss_gb": round(peak_uss / 2**30, 2),
            "anon_gb": round(peak_anon / 2**30, 2)}


def rss_anon(pid: int) -> int:
    """RssAnon of /proc/PID/status in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(part: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.scale_child", part, *args]


def train_cmd(root: Path, model: Path, out: Path, steps: int, processes: int,
              extra: tuple = ()) -> list[str]:
    prefix = [sys.executable] if processes == 1 else launch_prefix()
    return [*prefix, str(REPO / "finetune" / "run.py"), "--recipe", "msmarco_mnrl_cpu",
            f"data.path={root}", "data.queries=queries.train.tsv", "data.qrels=qrels.train.tsv",
            "data.hard_negatives=msmarco-hard-negatives.jsonl.gz", f"model.name_or_path={model}",
            "eval.data=", f"train.max_steps={steps}", "train.log_every=1",
            f"train.output_dir={out}", *extra]


def measure(size: int, parts, work: Path, env: dict, save, cold=(1, 2)) -> dict:
    root = write_msmarco(work / f"msmarco_{size}", size)
    model = write_model("bert", work / "tiny_bert")
    cache = work / f"cache_{size}"
    env = {**env, "HF_DATASETS_CACHE": str(cache)}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    rows = {}

    def run(name, cmd, cold=False):
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        rows[name] = watch(cmd, env, logs / f"{size}_{name.replace(' ', '_')}.log")
        print(f"{size:>9,} {name:<28} {rows[name]}", flush=True)
        save(rows)

    if "data" in parts:
        run("data cold", child("data", str(root)), cold=True)
        run("data warm", child("data", str(root)))
    if "train" in parts:
        for processes in (1, 2):
            out = work / "runs" / f"{size}_{processes}"
            shutil.rmtree(out.parent, ignore_errors=True)
            if processes in cold:
                run(f"first step cold x{processes}", train_cmd(root, model, out, 1, processes),
                    cold=True)
                shutil.rmtree(out.parent, ignore_errors=True)
            run(f"first step warm x{processes}", train_cmd(root, model, out, 1, processes))
            shutil.rmtree(out.parent, ignore_errors=True)
            run(f"101 steps warm x{processes}", train_cmd(root, model, out, 101, processes))
            rows[f"steps/s x{processes}"] = round(
                100 / max(1e-9, rows[f"101 steps warm x{processes}"]["s"]
                         - rows[f"first step warm x{processes}"]["s"]), 2)
            save(rows)
    if "teacher" in parts:
        scores, tables = write_teacher_scores(root), work / f"teacher_cache_{size}"
        shutil.rmtree(tables, ignore_errors=True)
        run("teacher scores cold", child("teacher", str(scores), str(tables)))
        run("teacher scores warm", child("teacher", str(scores), str(tables)))
    if "teacher_train" in parts:
        margin = (f"data.teacher_scores={write_teacher_scores(root)}", "data.teacher_margin=3.0",
                  "data.negatives_per_system=5")
        out = work / "runs" / f"{size}_teacher"
        for built in cache.glob("generator/*twotower-teacher_scores-*"):  # cold: the table too
            shutil.rmtree(built)
        for name in ("first step + teacher margin x1 (its table cold)",
                     "first step + teacher margin x1 warm"):
            shutil.rmtree(out.parent, ignore_errors=True)
            run(name, train_cmd(root, model, out, 1, 1, margin))
    if "bm25" in parts:  # built, not reloaded: an index saved by an earlier run is removed
        for saved in cache.glob("**/twotower-bm25-*"):
            shutil.rmtree(saved)
        run("bm25 build", child("bm25_build", str(root)))
        run("bm25 10k top-20 (index read)", child("bm25", str(root)))
    if "search" in parts:
        run("encode + shards + 1k exact", child("search", str(root), str(model),
                                                  str(work / f"shards_{size}")))
    if "random_search" in parts:
        folder = str(work / f"random_{size}")
        run("768-d fp16 write", child("random_write", str(size), folder))
        run("768-d fp16 1k exact", child("random_search", folder))
    return rows


def measure_stream(tokens: int, work: Path, env: dict, save) -> dict:
    corpus = write_pretraining_corpus(work / f"wiki_{tokens}.jsonl", round(tokens / WORDPIECES))
    cache = work / f"stream_cache_{tokens}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**env, "HF_DATASETS_CACHE": str(cache / "datasets")}
    rows = {}
    for name in ("stream cold", "stream warm"):
        rows[name] = watch(child("stream", str(corpus), _minilm(), str(cache)), env,
                           work / "logs" / f"{tokens}_{name.replace(' ', '_')}.log")
        print(f"{tokens:>11,} tokens {name:<18} {rows[name]}", flush=True)
        save(rows)
    return rows


def growth_table(results: dict) -> str:
    sizes = sorted(results, key=int)
    names = list(dict.fromkeys(n for s in sizes for n in results[s]))
    lines = ["| measure | " + " | ".join(f"{int(s):,}" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in names:
        cells, prev = [], None
        for s in sizes:
            v = results[s].get(name)
            if v is None:
                cells.append("–")
                continue
            text = (f"{v['s']} s, RSS {v['rss_gb']} / PSS {v['pss_gb']} / USS "
                    f"{v.get('uss_gb', '–')} / anon {v.get('anon_gb', '–')} GB"
                    if isinstance(v, dict) else f"{v}")
            now = v["s"] if isinstance(v, dict) else v
            if prev:
                text += f" (×{now / prev:.1f} time)"
            cells.append(text)
            prev = now
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--cold", type=int, nargs="*", choices=(1, 2), default=[1, 2],
                    help="process counts whose first step is also measured cold (the cold 8.8 M "
                         "start tokenises the collection: ~35 min here, so once is enough)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/twotower-scale"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "logs").mkdir(exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    path = args.results / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    command = " ".join(["python -m benchmarks.scale", *(argv if argv is not None else sys.argv[1:])])

    def saver(table: str, n: int):
        def save(rows: dict) -> None:  # after every measurement: a killed run keeps its rows
            if path.exists():  # rows another run wrote meanwhile are kept
                results.update(json.loads(path.read_text()))
            results.setdefault(table, {}).setdefault(str(n), {}).update(rows)
            path.write_text(json.dumps(results, indent=1))
            (args.results / "scale.md").write_text(report(results, command))
        return save

    if set(args.parts) - {"stream"}:
        for size in args.sizes:
            measure(size, args.parts, args.work, env, saver("passages", size), cold=args.cold)
    if "stream" in args.parts:
        for tokens in args.tokens:
            measure_stream(tokens, args.work, env, saver("tokens", tokens))
    print(report(results, command))


def report(results: dict, command: str) -> str:
    text = f"Last command: {command}\n\nPassages (MS MARCO-shaped collection):\n\n"
    text += growth_table(results.get("passages", {}))
    if results.get("tokens"):
        text += "\nPretraining token stream (tokens):\n\n" + growth_table(results["tokens"])
    return text


if __name__ == "__main__":
    main()
