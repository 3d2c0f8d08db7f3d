"""What only a GPU shows (one CUDA device; CI has none); each prints and writes
OUT_DIR/gpu_<name>.json.

    python -m benchmarks.gpu fp16 OUT_DIR
        the fp16 path of the GPU recipes -- autocast and a GradScaler created, used, checkpointed
        and restored -- on the shared training loop through the toy stage of the tests
        (tests/scripts/toy_train.py, tiny BERT, dropout 0): (1) fp16, 6 steps, a checkpoint every
        2: scaler.pt in each, its scale recorded; (2) the same run stopped at step 3 and resumed
        to 6 (constant LR): weights and scaler state against the uninterrupted run; (3)
        non-reentrant gradient checkpointing under fp16 against the same run without it;
        (4) train.global_batch_size=16 on one GPU (16 per device).
    python -m benchmarks.gpu step_time OUT_DIR
        seconds per optimizer step of the paper pretraining recipes' shapes, for the README's
        wall-time estimate: bert-base-uncased's architecture with random weights, fp16 autocast,
        AdamW (fused), mean pooling, InfoNCE over the gathered keys; crops padded to 128 tokens
        (half a 256-token chunk: the longest crop of ratio_max 0.5). Per GPU on 8 GPUs:
        contriever 256 queries (forward + backward) + 256 keys (MoCo: forward only);
        recontriever 256 queries + 1,024 keys (4 key crops per query).
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
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "scripts" / "toy_train.py"
BASE = ["train.log_every=1", "train.lr=1e-3", "train.warmup_steps=0", "n_pairs=96",
        "train.scheduler=constant", "train.per_device_batch_size=16",
        "train.mixed_precision=fp16", "train.keep_last=5"]
SHAPES = {"contriever": (256, 256, 128), "recontriever": (256, 1024, 128)}


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


def fp16(out: Path, result: dict) -> None:
    result["fp16_seconds"] = toy(out / "straight", "train.max_steps=6", "train.save_every=2")
    result["scaler_scale_at_steps_2_4"] = {step: float(torch.load(
        out / "straight" / "checkpoints" / f"step-{step:08d}" / "scaler.pt",
        weights_only=False)["scale"]) for step in (2, 4)}
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


def seconds_per_step(queries: int, keys: int, length: int, repeats: int = 5) -> float:
    torch.manual_seed(0)
    model, key_model = BertModel(BertConfig()).cuda(), BertModel(BertConfig()).cuda().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        q_ids = torch.randint(1000, 30000, (queries, length), device="cuda")
        k_ids = torch.randint(1000, 30000, (keys, length), device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            q = model(input_ids=q_ids, attention_mask=torch.ones_like(q_ids)).last_hidden_state.mean(1)
            with torch.no_grad():
                k = key_model(input_ids=k_ids, attention_mask=torch.ones_like(k_ids)).last_hidden_state.mean(1)
            logits = (q @ k.T).float() / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(queries, device="cuda") % keys)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def step_time(out: Path, result: dict) -> None:
    params = sum(p.numel() for n, p in BertModel(BertConfig()).named_parameters()
                 if "embeddings" not in n)
    for name, (queries, keys, length) in SHAPES.items():
        s = seconds_per_step(queries, keys, length)
        flops = 2 * params * length * (3 * queries + keys)  # matmul FLOPs, attention left out
        result[name] = {"queries": queries, "keys": keys, "length": length,
                        "seconds_per_step": round(s, 4), "model_tflops_per_s": round(flops / s / 1e12, 1)}


def main(argv: list[str]) -> dict:
    if len(argv) != 2 or argv[0] not in ("fp16", "step_time"):
        raise SystemExit("usage: python -m benchmarks.gpu {fp16,step_time} OUT_DIR")
    assert torch.cuda.is_available(), "needs a CUDA device"
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    {"fp16": fp16, "step_time": step_time}[argv[0]](out, result)
    print(json.dumps(result, indent=2))
    (out / f"gpu_{argv[0]}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
