"""A collection 10x larger is loaded, trained on and evaluated without the process holding more of
it (issue #23, the small version of benchmarks/scale.py): tests/scripts/memory_growth.py runs
msmarco_mnrl_cpu for 2 steps on an MS MARCO-layout collection, then evaluates through on-disk
shards and indexes it with BM25, under tracemalloc, at 1,000 and 10,000 passages. What the process
holds when training starts, its peak before that and its peak while evaluating may grow by at most
a tenth of what the collection's texts grow by (one Python copy of the ids alone would be about a
quarter; the texts, all of it); BM25's indexing and search by half. The in-RAM evaluation is
measured too, to show the measure sees a copy: it grows by more than the texts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(n: int, work: Path, model: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "memory_growth.py"),
                          str(n), str(work), str(model)], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                     "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ten_times_the_collection_adds_nothing_to_the_process(tmp_path, tiny_encoder_factory):
    tiny_encoder_factory(hidden=32, layers=1, heads=2).save(tmp_path / "model")
    small = _run(1_000, tmp_path / "small", tmp_path / "model")
    large = _run(10_000, tmp_path / "large", tmp_path / "model")
    assert (small["n_docs"], large["n_docs"]) == (1_000, 10_000)
    grown = large["text_bytes"] - small["text_bytes"]
    for measure in ("held_at_first_step", "peak_before_training", "peak_evaluating"):
        assert large[measure] - small[measure] < 0.1 * grown, (measure, small, large)
    assert large["peak_evaluating_in_ram"] - small["peak_evaluating_in_ram"] > grown, (small, large)
    # BM25 over the same passages without their numbers (a vocabulary that does not grow here):
    # per-document numbers grow (lengths, the table's id index being built, a query's score of
    # every document: 0.26x the texts), the tokens do not (as Python lists, before: 3.9x)
    assert large["peak_bm25"] - small["peak_bm25"] < 0.5 * grown, (small, large)
