"""Run a function in N gloo processes on this machine (tests of the distributed code paths)."""
import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(processes: int) -> list[str]:
    """`accelerate launch` of `processes` gloo processes on this machine (empty for 1 process);
    the script or `-m module` and its arguments follow."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "--main_process_port", str(free_port())]


def run_to_end(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own: a run still
    going after `timeout` s fails the test and is killed with every process it started, not only
    `accelerate launch` (a hung gloo collective would otherwise outlive the test)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... still running after {timeout} s:\n"
                    f"{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int = 2, args: tuple = ()) -> list:
    """Call `fn(rank, world, *args)` in `world` processes; return each rank's result.

    `fn` must be importable (module-level) and its result picklable by torch.save.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
