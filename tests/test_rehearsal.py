"""The rehearsal (benchmarks/rehearse.py, `make rehearse`) of the two mission commands' recipes,
as committed: `recontriever` (pretrain/run.py) and `pair_two_stage` (finetune/run.py), each under
`accelerate launch --multi_gpu --num_processes 2` on CPU with tiny models of the recipe's
architecture classes and synthetic data in the official layouts. Every column must pass: the run
ends (rc 0) with a finite loss, a run SIGKILLed (all its processes) after a complete checkpoint
in epoch 1 and resumed ends bit for bit where the uninterrupted run ends, and the exported model
gives the toolkit's embeddings under sentence-transformers. About 2-3 minutes on 2 cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import rehearse

REPO = Path(__file__).resolve().parents[1]

MISSION = ["recontriever", "pair_two_stage"]


@pytest.mark.slow
@pytest.mark.skipif(not (Path(os.environ.get("TWOTOWER_DATA", "/absent")) / "scifact").is_dir(),
                    reason="the offline data ($TWOTOWER_DATA) the synthetic texts come from is absent")
@pytest.mark.timeout(420)
def test_mission_recipes_rehearse(tmp_path):
    lines: list[str] = []
    sizes = rehearse.Sizes(timeout=180)
    rows = rehearse.rehearse(MISSION, tmp_path, sizes, say=lines.append)
    report = "\n".join(lines) + "\n" + rehearse.table(rows)
    for row in rows:  # a failure shows its launch logs' ends, not only the table's one line
        if not row.passed:
            for log in sorted((tmp_path / row.recipe).rglob("*.log")):
                end = log.read_text(errors="replace").splitlines()[-40:]
                report += f"\n--- {log.relative_to(tmp_path)} (last 40 lines)\n" + "\n".join(end)
    assert [r.recipe for r in rows] == MISSION
    # the substitutions are said: tiny models of the named classes, synthetic data, smaller sizes
    assert any("bert-base-uncased -> tiny random BertModel" in x for x in lines), report
    assert any("distilbert-base-uncased -> tiny random DistilBertModel" in x for x in lines), report
    assert any("cross-encoder/ms-marco-MiniLM-L-6-v2 -> tiny random "
               "BertForSequenceClassification" in x for x in lines), report
    assert any("method.queue_size: 131072 ->" in x for x in lines), report
    for row in rows:
        assert row.passed, report
        assert row.resume.startswith(f"ok (killed after step {sizes.kill_after})"), report
    assert rows[0].steps == str(sizes.steps), report
    assert rows[1].steps == f"pseudo {sizes.steps}, labelled {sizes.steps}", report
