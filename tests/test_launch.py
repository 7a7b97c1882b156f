"""common.launch: the CPU/DeepSpeed decision and the DeepSpeed config the scripts fill in."""

import pytest
import torch

from common.launch import deepspeed_requested, launch_command, make_accelerator


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is about machines without CUDA")
def test_deepspeed_without_cuda_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert deepspeed_requested()
    with pytest.raises(RuntimeError, match="single process"):
        make_accelerator()


def test_launch_command_really_starts_several_cpu_processes():
    cmd = launch_command("eval.py", ["a=1"], num_processes=2, main_process_port=29999)
    assert cmd[-2:] == ["eval.py", "a=1"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2" and "--cpu" not in cmd
