"""Progress for every step that can take more than a few seconds on a real collection (BM25
indexing and search, teacher scoring, encoding): a tqdm bar on a terminal; elsewhere (a log file,
CI, a batch job) one line at most every 30 s, so a long step is never silent and a log not flooded."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    terminal = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled,
                mininterval=0.1 if terminal else LOG_INTERVAL_S, dynamic_ncols=terminal)
