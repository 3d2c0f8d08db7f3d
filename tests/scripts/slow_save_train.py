"""The toy stage (toy_train.py) whose checkpoint of step $TWOTOWER_TEST_SLOW_SAVE_STEP stalls
*inside* `Accelerator.save_state`, after accelerate has written its files and before returning, so
a test can SIGKILL the process in the middle of writing a checkpoint. Test-only: the patch lives
in this child process, production code is untouched."""
import os
import time
from pathlib import Path

import accelerate

from tests.scripts.toy_train import main

STALL_STEP = int(os.environ.get("TWOTOWER_TEST_SLOW_SAVE_STEP", "0"))
_save_state = accelerate.Accelerator.save_state


def stalling_save_state(self, output_dir=None, *args, **kwargs):
    result = _save_state(self, output_dir, *args, **kwargs)
    if STALL_STEP and Path(str(output_dir)).name == f".partial-step-{STALL_STEP:08d}":
        (Path(str(output_dir)) / "STALLED").write_text(str(os.getpid()))  # tells the test "now"
        time.sleep(600)
    return result


accelerate.Accelerator.save_state = stalling_save_state

if __name__ == "__main__":
    main()
