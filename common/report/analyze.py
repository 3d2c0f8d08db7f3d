"""Look at an embedding space: diagnostics, a 2-D map of both towers and distance histograms.

CLI:      python -m twotower.common.report.analyze --model bundled:all-MiniLM-L6-v2 --data scifact \\
              --max-queries 100 --max-docs 500 --output-dir runs/analyze/minilm-scifact
          writes diagnostics.json, towers.png, distances.png and report.html (self-contained).
Library:  analyze_embeddings(query_emb, doc_emb, positives) -> Analysis (no model needed)
          analyze_encoder(encoder, data, AnalyzeArgs()) -> Analysis
          diagnostics_evaluator(eval_args) -> encoder -> (scalars, overview PNG), for training
          log_diagnostics(accelerator_or_writer, step, scalars, image_png): tensorboard
What the numbers mean: common/report/diagnostics.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from twotower.common.data import column, resolve_data
from twotower.common.eval.cli import slug
from twotower.common.eval.evaluate import eval_args_data, judged_queries, load_eval_data, subsample
from twotower.common.eval.html import render_html
from twotower.common.eval.sharded import process_device
from twotower.common.model.encoder import Encoder
from twotower.common.report.diagnostics import (DESCRIPTIONS, Diagnostics, DiagnosticsArgs,
                                                compute_diagnostics)
from twotower.common.report.plots import (PROJECTIONS, plot_distance_histograms, plot_overview,
                                          plot_towers, png_to_array, project_2d)

logger = logging.getLogger("twotower.common.report.analyze")
OUTPUT_FILES = ("diagnostics.json", "towers.png", "distances.png", "report.html")


@dataclass
class AnalyzeArgs:
    max_queries: int = 200  # judged queries sampled (0 = all)
    max_docs: int = 1000  # documents besides the judged ones of the sampled queries (0 = all)
    seed: int = 0  # sampling, random pairs and t-SNE
    projection: str = "tsne"  # tsne | pca (pca is much faster, e.g. during training)
    max_plot_points: int = 2000  # t-SNE cost grows with n²; a random subset beyond this
    batch_size: int = 64
    diagnostics: DiagnosticsArgs = field(default_factory=DiagnosticsArgs)


@dataclass
class Analysis:
    diagnostics: Diagnostics
    coords: np.ndarray  # 2-D positions of the plotted points: queries first, then documents
    n_plot_queries: int
    projection: str
    images: dict[str, bytes]  # file name -> PNG

    def overview_png(self, title: str | None = None) -> bytes:
        return plot_overview(self.coords, self.n_plot_queries, self.diagnostics,
                             self.projection, title)


def analyze_embeddings(query_emb: np.ndarray, doc_emb: np.ndarray,
                       positives: Sequence[tuple[int, int]] = (), similarity: str = "cos",
                       args: AnalyzeArgs | None = None) -> Analysis:
    """Diagnostics and plots of given embeddings (`positives`: judged (query row, doc row))."""
    args = args or AnalyzeArgs()
    if args.projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, "
                         f"got {args.projection!r}")
    diag = compute_diagnostics(query_emb, doc_emb, positives, similarity, args.diagnostics,
                               args.seed)
    rng = np.random.default_rng(args.seed)
    n_q = min(len(query_emb), max(args.max_plot_points // 2, args.max_plot_points - len(doc_emb)))
    n_d = min(len(doc_emb), args.max_plot_points - n_q)
    q_rows = np.sort(rng.choice(len(query_emb), n_q, replace=False))
    d_rows = np.sort(rng.choice(len(doc_emb), n_d, replace=False))
    points = np.concatenate([np.asarray(query_emb)[q_rows], np.asarray(doc_emb)[d_rows]])
    coords = project_2d(points, args.projection, args.seed)
    images = {"towers.png": plot_towers(coords, n_q, args.projection),
              "distances.png": plot_distance_histograms(diag)}
    return Analysis(diag, coords, n_q, args.projection, images)


def sample_for_analysis(data, args: AnalyzeArgs):
    """(query texts, document rows {title, text}, positive (query row, doc row) pairs) of the
    sampled slice of `data` (a twotower.common.data.RetrievalData)."""
    data = subsample(data, args.max_queries, args.max_docs, args.seed)
    qids, qtexts = judged_queries(data)
    doc_ids = [str(d) for d in column(data.corpus, "id")]
    titles = (column(data.corpus, "title") if "title" in data.corpus.column_names
              else [""] * len(doc_ids))
    docs = [{"title": t, "text": x} for t, x in zip(titles, column(data.corpus, "text"))]
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    positives = [(qi, doc_row[d]) for qi, q in enumerate(qids)
                 for d, rel in data.qrels.get(q, {}).items() if rel > 0 and d in doc_row]
    return qtexts, docs, positives


def analyze_encoder(encoder, data, args: AnalyzeArgs | None = None,
                    progress: bool = True) -> Analysis:
    """Encode a sample of `data` with `encoder` (twotower.common.model.encoder.Encoder) and analyse it."""
    args = args or AnalyzeArgs()
    qtexts, docs, positives = sample_for_analysis(data, args)
    query_emb = encoder.encode_queries(qtexts, batch_size=args.batch_size, progress=progress)
    doc_emb = encoder.encode_corpus(docs, batch_size=args.batch_size, progress=progress)
    return analyze_embeddings(query_emb, doc_emb, positives, encoder.similarity, args)


# ------------------------------------------------------------------------- training
def diagnostics_evaluator(eval_args, args: AnalyzeArgs | None = None
                          ) -> Callable[[Any], tuple[dict[str, float], bytes]]:
    """For periodic evaluation while training: loads `eval_args.data` (twotower.common.recipe.args.EvalArgs)
    once and returns `encoder -> (diagnostic scalars, overview PNG)`."""
    args = args or AnalyzeArgs()
    data = subsample(eval_args_data(eval_args), args.max_queries,
                     args.max_docs, args.seed)
    sampled = replace(args, max_queries=0, max_docs=0)  # the same sample at every evaluation

    def evaluate(encoder) -> tuple[dict[str, float], bytes]:
        analysis = analyze_encoder(encoder, data, sampled, progress=False)
        return analysis.diagnostics.scalars(), analysis.overview_png()

    return evaluate


def log_diagnostics(target, step: int, scalars: dict[str, float], image_png: bytes | None = None,
                    prefix: str = "diagnostics") -> None:
    """Log scalars as `{prefix}/{name}` and the PNG as image `{prefix}/overview` at `step`.

    `target` is an `accelerate.Accelerator` (scalars through `accelerator.log`, so every tracker
    gets them; the image through its tensorboard tracker; nothing on non-main processes) or a
    tensorboard `SummaryWriter` (anything with add_scalar/add_image)."""
    tagged = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
    if hasattr(target, "get_tracker"):
        if not target.is_main_process:
            return
        target.log(tagged, step=step)
        boards = [t for t in target.trackers if t.name == "tensorboard"]
        if image_png is not None and not boards:
            logger.warning("no tensorboard tracker on the Accelerator: the diagnostics image "
                           "is not logged (Accelerator(log_with='tensorboard'))")
        writer = boards[0].writer if boards else None
    else:
        writer = target
        for tag, value in tagged.items():
            writer.add_scalar(tag, value, global_step=step)
    if writer is not None and image_png is not None:
        writer.add_image(f"{prefix}/overview", png_to_array(image_png), global_step=step,
                         dataformats="HWC")
        writer.flush()


# ---------------------------------------------------------------------------- outputs
def write_analysis(analysis: Analysis, output_dir: str | Path, info: dict | None = None,
                   overwrite: bool = False) -> dict[str, Path]:
    """diagnostics.json, the PNGs and report.html in `output_dir`."""
    output_dir = Path(output_dir)
    found = [n for n in OUTPUT_FILES if (output_dir / n).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{output_dir} already has {', '.join(found)}; pass --overwrite "
                              "(overwrite=True) or choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in OUTPUT_FILES}
    for name, png in analysis.images.items():
        paths[name].write_bytes(png)
    summary = {"info": info or {}, "projection": analysis.projection,
               "diagnostics": analysis.diagnostics.to_json()}
    paths["diagnostics.json"].write_text(json.dumps(summary, indent=2) + "\n")
    scalars = analysis.diagnostics.scalars()
    title = f"Embedding diagnostics: {(info or {}).get('model', '?')} on {(info or {}).get('data', '?')}"
    captions = {"towers.png": "2-D map of queries and documents (colour = tower)",
                "distances.png": "distances from each query to its top-1 document, its judged "
                                 "positives and random documents"}
    paths["report.html"].write_text(render_html(
        title=title, metrics=scalars, info=info, metrics_header=("diagnostic", "value"),
        metric_notes=DESCRIPTIONS,
        images={captions.get(n, n): png for n, png in analysis.images.items()}), encoding="utf-8")
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower.common.report.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    d = AnalyzeArgs()
    p.add_argument("--model", required=True, help="hub id, local folder or bundled:all-MiniLM-L6-v2")
    p.add_argument("--data", required=True, help="data name under $TWOTOWER_DATA or a folder")
    p.add_argument("--split", default="test")
    p.add_argument("--max-queries", type=int, default=d.max_queries, help="0 = all judged")
    p.add_argument("--max-docs", type=int, default=d.max_docs,
                   help="documents besides the judged ones (0 = whole corpus)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--projection", choices=PROJECTIONS, default=d.projection)
    p.add_argument("--max-plot-points", type=int, default=d.max_plot_points)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--output-dir", help="default runs/analyze/<model>-<data>-<split>")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.max_plot_points < 4:
        parser.error("--max-plot-points must be at least 4")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU variant

    data_path = resolve_data(ns.data)
    output_dir = Path(ns.output_dir or Path("runs", "analyze",
                                            f"{slug(ns.model)}-{data_path.name}-{ns.split}"))
    found = [n for n in OUTPUT_FILES if (output_dir / n).exists()]
    if found and not ns.overwrite:  # refuse before encoding anything
        parser.error(f"{output_dir} already has {', '.join(found)}; pass --overwrite or choose "
                     "another --output-dir")
    args = AnalyzeArgs(max_queries=ns.max_queries, max_docs=ns.max_docs, seed=ns.seed,
                       projection=ns.projection, max_plot_points=ns.max_plot_points,
                       batch_size=ns.batch_size)
    encoder = Encoder.load(ns.model).to(process_device())
    analysis = analyze_encoder(encoder, load_eval_data(data_path, ns.split), args,
                               progress=not ns.no_progress)
    info = {"model": ns.model, "data": data_path.name, "split": ns.split,
            "similarity": encoder.similarity, "settings": {k: v for k, v in asdict(args).items()
                                                          if k != "diagnostics"},
            "command": "python -m twotower.common.report.analyze " + " ".join(sys.argv[1:] if argv is None else argv)}
    paths = write_analysis(analysis, output_dir, info, overwrite=ns.overwrite)
    for name, value in analysis.diagnostics.scalars().items():
        print(f"{name:<26} {value}" if isinstance(value, int) else f"{name:<26} {value:.4f}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
