"""Plots, the analyze CLI and tensorboard logging of the diagnostics (synthetic data, tiny BERT)."""
import json

import numpy as np
import pytest

from tests.fixtures_data import write_jsonl, write_text
from twotower.common.eval.figures import plot_per_query
from twotower.common.recipe.args import EvalArgs
from twotower.common.report.analyze import (AnalyzeArgs, analyze_embeddings, diagnostics_evaluator,
                                            log_diagnostics, main)
from twotower.common.report.diagnostics import compute_diagnostics
from twotower.common.report.plots import (plot_compare_bars, plot_distance_histograms, plot_towers,
                                          png_to_array, project_2d)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_clusters(n=50, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    a, b = np.zeros(dim), np.zeros(dim)
    a[0], b[1] = 1.0, 1.0
    return np.concatenate([a + 0.05 * rng.normal(size=(n, dim)),
                           b + 0.05 * rng.normal(size=(n, dim))])


def neighbour_purity(coords, labels):
    """Share of points whose nearest 2-D neighbour has the same label."""
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    return float(np.mean(labels[dist.argmin(axis=1)] == labels))


def tiny_beir(root, n=12, split="test"):
    """n queries, each judged relevant to one of 2n documents (word overlap only with it)."""
    words = ["apple", "river", "cloud", "stone", "music", "tiger", "paper", "glass", "honey",
             "laser", "mango", "orbit", "pearl", "quilt", "radar", "sugar", "tulip", "umbra",
             "vapor", "wheat", "xenon", "yacht", "zebra", "amber"]
    docs = [{"_id": f"d{i}", "title": words[i], "text": f"{words[i]} facts and notes number {i}"}
            for i in range(2 * n)]
    queries = [{"_id": f"q{i}", "text": f"tell me about {words[i]}"} for i in range(n)]
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "queries.jsonl", queries)
    write_text(root / "qrels" / f"{split}.tsv",
               "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
    return root


def test_tsne_and_pca_keep_separated_clusters_apart():
    x = two_clusters()
    labels = np.repeat([0, 1], 50)
    tsne = project_2d(x, "tsne", seed=0)
    assert np.allclose(tsne, project_2d(x, "tsne", seed=0))  # seeded: the same picture again
    for coords in (tsne, project_2d(x, "pca")):
        assert coords.shape == (100, 2)
        assert neighbour_purity(coords, labels) >= 0.95
    with pytest.raises(ValueError, match="projection"):
        project_2d(x, "umap")


def test_plots_are_non_blank_pngs():
    x = two_clusters()
    diag = compute_diagnostics(x[:50], x[50:], positives=[(i, i) for i in range(50)])
    pngs = [plot_towers(project_2d(x, "pca"), 50, "pca"), plot_distance_histograms(diag),
            plot_per_query({f"q{i}": i / 10 for i in range(10)}, "nDCG@10"),
            plot_compare_bars({"a": {"x": 0.5, "y": 0.6}, "b": {"x": 0.7}}, "nDCG@10",
                              {"b": {"x": "*†"}})]
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        image = png_to_array(png)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 10  # something is drawn on the white background


def test_analyze_embeddings_caps_the_plotted_points():
    x = two_clusters(n=60)
    analysis = analyze_embeddings(x[:60], x[60:], args=AnalyzeArgs(projection="pca",
                                                                   max_plot_points=50))
    assert analysis.coords.shape == (50, 2) and analysis.n_plot_queries == 25
    assert analysis.diagnostics.n_queries == 60  # metrics still use every point
    assert set(analysis.images) == {"towers.png", "distances.png"}


def test_log_diagnostics_to_a_summary_writer_and_an_accelerator(tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    x = two_clusters()
    analysis = analyze_embeddings(x[:50], x[50:], args=AnalyzeArgs(projection="pca"))
    scalars = analysis.diagnostics.scalars()
    png = analysis.overview_png()
    writer = SummaryWriter(str(tmp_path / "sw"))
    log_diagnostics(writer, 7, scalars, png)
    writer.close()
    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "acc"))
    acc.init_trackers("tb")
    log_diagnostics(acc, 3, scalars, png, prefix="diag")
    acc.end_training()
    for folder, step, prefix in ((tmp_path / "sw", 7, "diagnostics"), (tmp_path / "acc", 3, "diag")):
        events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent),
                                  size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        tag = f"{prefix}/uniformity_query"
        assert tag in events.Tags()["scalars"]
        logged = events.Scalars(tag)[0]
        assert logged.step == step
        assert logged.value == pytest.approx(scalars["uniformity_query"], rel=1e-6)
        image = events.Images(f"{prefix}/overview")[0]
        assert image.step == step and image.width == png_to_array(png).shape[1]


def test_analyze_cli_and_training_evaluator_on_a_tiny_model(tmp_path, tiny_encoder_factory):
    data = tiny_beir(tmp_path / "tiny")
    model_dir = tiny_encoder_factory(hidden=32, layers=1).save(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data", str(data), "--max-queries", "8",
            "--max-docs", "10", "--projection", "pca", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "diagnostics.json").read_text())
    diag = summary["diagnostics"]
    assert diag["n_queries"] == 8 and diag["n_docs"] == 18  # 8 judged + 10 sampled
    assert diag["n_positive_pairs"] == 8 and len(diag["top1_distances"]) == 8
    assert summary["info"]["data"] == "tiny"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "uniformity_query" in page
    for name in ("towers.png", "distances.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit):  # refuses to overwrite without --overwrite
        main(argv)

    evaluate = diagnostics_evaluator(EvalArgs(data=str(data)),
                                     AnalyzeArgs(max_queries=6, max_docs=4, projection="pca"))
    scalars, png = evaluate(tiny_encoder_factory(hidden=32, layers=1))
    assert scalars["n_queries"] == 6 and scalars["n_docs"] == 10
    assert png.startswith(PNG_MAGIC)
