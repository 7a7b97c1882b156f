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


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(**kwargs):
    """Accelerator on the GPUs, or on the CPU when there is no CUDA.

    DeepSpeed runs without CUDA too (DS_ACCELERATOR=cpu), across several processes as well: accelerate
    picks no process-group backend for it there and would count one process while DeepSpeed sees all
    of them, so the process state is created first with gloo (ENVIRONMENT.md, "DeepSpeed ZeRO-3 across
    2 CPU processes"). accelerate never starts DeepSpeed when told to use the CPU, so it is not told."""
    from accelerate import Accelerator, PartialState

    cpu = not torch.cuda.is_available()
    if cpu and deepspeed_requested():
        skip_cpu_shm_op()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            PartialState(backend="gloo")
        cpu = False
    accelerator = Accelerator(cpu=cpu, **kwargs)
    plugin = accelerator.state.deepspeed_plugin
    accelerator.print(f"accelerate: {accelerator.distributed_type.value}"
                      + (f" ZeRO-{plugin.zero_stage}" if plugin is not None else "")
                      + f", {accelerator.num_processes} process(es) on {accelerator.device.type}")
    return accelerator


def skip_cpu_shm_op() -> None:
    """DeepSpeed on the CPU compiles a shared-memory all-reduce op (C++, about 2.5 min) the first time each
    environment starts it. It only speeds up CPU collectives, and the CPU runs here are rehearsals of the
    GPU path (tests, ZeRO-3 on gloo ranks), so mark it unavailable: DeepSpeed then uses torch.distributed
    (gloo), as it does on machines where the op cannot build. GPUs never use this op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Put the script's batch size and clipping into the DeepSpeed config (no-op without DeepSpeed).
    DeepSpeed needs the per-device batch, which accelerate reads from a DataLoader these scripts do
    not hand to `prepare`; and DeepSpeed clips inside its own step, at the config's value (0 = off),
    not the script's. Call before `accelerator.prepare`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
    accumulation = accelerator.gradient_accumulation_steps
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = accumulation
    plugin.deepspeed_config["train_batch_size"] = micro_batch_size * accumulation * accelerator.num_processes


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


def cpu_launch_env(deepspeed: bool = False) -> dict:
    """Environment for launching CPU processes: accelerate must be told to stay off CUDA (except
    for DeepSpeed, which accelerate starts only when it is not told so; see make_accelerator)."""
    env = dict(os.environ)
    if not torch.cuda.is_available() and not deepspeed:
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
