"""Launching on one CPU, several CPU processes, or many GPUs with the same script.

Scripts create their Accelerator with `make_accelerator()`; on a machine without CUDA it runs on
the CPU with the gloo backend. Note the CPU trap (ENVIRONMENT.md): `accelerate launch --cpu
--num_processes 2` silently starts ONE process; `launch_command` builds the form that works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch


def make_accelerator(**kwargs):
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


def launch_command(script: str, args: Sequence[str] = (), num_processes: int = 1,
                   accelerate_config: str | None = None, main_process_port: int | None = None) -> list[str]:
    """`accelerate launch` command line for `script` that really starts `num_processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    if num_processes > 1 or accelerate_config:
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1"]
    if num_processes > 1 and not accelerate_config:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    return [*cmd, script, *args]


def cpu_launch_env() -> dict:
    """Environment for launching CPU processes: accelerate must be told to stay off CUDA."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
