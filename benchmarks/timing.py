"""Interleaved timing, standard library only: benchmarks/perf_encode.py and st_backends.py use it
here, and benchmarks/st_backends_venv.py in a venv without twotower (`python -m
benchmarks.st_backends_venv` from the checkout)."""
from __future__ import annotations

import statistics
import time


def interleaved(systems: dict, texts: list[str], repeats: int, base: str) -> dict:
    """name -> docs/s of `texts` (median of `repeats` passes, the systems interleaved so that a
    burst of load hits every system alike), its times and its speed-up over system `base`."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            start = time.perf_counter()
            fn(texts)
            times[name].append(time.perf_counter() - start)
    first = statistics.median(times[base])
    return {name: {"median_s": round(statistics.median(ts), 3),
                   "times_s": [round(t, 3) for t in ts],
                   "docs_per_s": round(len(texts) / statistics.median(ts), 2),
                   "speedup_vs_st": round(first / statistics.median(ts), 3)}
            for name, ts in times.items()}
