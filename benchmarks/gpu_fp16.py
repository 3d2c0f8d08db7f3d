"""What only a GPU shows (run on one CUDA device; CI has none): the fp16 path of the GPU recipes
-- autocast and a GradScaler created, used, checkpointed and restored -- on the shared training
loop through the toy stage of the tests (tests/scripts/toy_train.py, tiny BERT, dropout 0):

  1. fp16, 6 steps, a checkpoint every 2: scaler.pt in each checkpoint, its scale recorded;
  2. the same run stopped at step 3 and resumed to 6 (constant LR): weights and scaler state
     against the uninterrupted run;
  3. non-reentrant gradient checkpointing under fp16 against the same run without it;
  4. train.global_batch_size=16 on one GPU (16 per device).

    python -m benchmarks.gpu_fp16 OUT_DIR     # prints and writes OUT_DIR/gpu_fp16.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "scripts" / "toy_train.py"
BASE = ["train.log_every=1", "train.lr=1e-3", "train.warmup_steps=0", "n_pairs=96",
        "train.scheduler=constant", "train.per_device_batch_size=16",
        "train.mixed_precision=fp16", "train.keep_last=5"]


def toy(out: Path, *overrides: str, resume: bool = False) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, str(TOY), "--recipe", "none", f"train.output_dir={out}", *BASE,
           *overrides] + (["--resume"] if resume else [])
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def max_diff(a: Path, b: Path) -> float:
    wa, wb = (load_file(str(p / "model" / "model.safetensors")) for p in (a, b))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def main(out: Path) -> dict:
    assert torch.cuda.is_available(), "needs a CUDA device"
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["fp16_seconds"] = toy(out / "straight", "train.max_steps=6", "train.save_every=2")
    scales = {}
    for step in (2, 4):
        state = torch.load(out / "straight" / "checkpoints" / f"step-{step:08d}" / "scaler.pt",
                           weights_only=False)
        scales[step] = float(state["scale"])
    result["scaler_scale_at_steps_2_4"] = scales
    toy(out / "resumed", "train.max_steps=3", "train.save_every=3")
    toy(out / "resumed", "train.max_steps=6", "train.save_every=3", resume=True)
    result["resume_max_weight_diff"] = max_diff(out / "straight", out / "resumed")
    a, b = (torch.load(p / "checkpoints" / "step-00000006" / "scaler.pt", weights_only=False)
            for p in (out / "straight", out / "resumed"))
    result["resume_scaler_equal"] = a == b
    toy(out / "gc", "train.max_steps=6", "model.gradient_checkpointing=true")
    result["grad_checkpointing_max_weight_diff"] = max_diff(out / "straight", out / "gc")
    toy(out / "global", "train.max_steps=2", "train.global_batch_size=16")
    result["global_batch_ok"] = (out / "global" / "model").is_dir()
    print(json.dumps(result, indent=2))
    (out / "gpu_fp16.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]))
