"""Seconds per optimizer step of the paper pretraining recipes' shapes on one GPU, for the README's
wall-time estimate (run on a CUDA device; CI has none). bert-base-uncased's architecture with
random weights, fp16 autocast, AdamW (fused), mean pooling, InfoNCE over the gathered keys; crops
padded to 128 tokens (half a 256-token chunk: the longest crop of ratio_max 0.5).

  contriever   per GPU on 8 GPUs: 256 queries (forward + backward) + 256 keys (MoCo: forward only)
  recontriever per GPU on 8 GPUs: 256 queries + 1,024 keys (4 key crops per query)

    python -m benchmarks.gpu_step_time OUT_DIR
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

SHAPES = {"contriever": (256, 256, 128), "recontriever": (256, 1024, 128)}


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


def main(out: Path) -> dict:
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    params = sum(p.numel() for n, p in BertModel(BertConfig()).named_parameters()
                 if "embeddings" not in n)
    for name, (queries, keys, length) in SHAPES.items():
        s = seconds_per_step(queries, keys, length)
        flops = 2 * params * length * (3 * queries + keys)  # matmul FLOPs, attention left out
        result[name] = {"queries": queries, "keys": keys, "length": length,
                        "seconds_per_step": round(s, 4), "model_tflops_per_s": round(flops / s / 1e12, 1)}
    print(json.dumps(result, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_step_time.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]))
