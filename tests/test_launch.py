"""common.launch: the CPU/DeepSpeed decision and the DeepSpeed config the scripts fill in."""

from common.launch import launch_command


def test_launch_command_really_starts_several_cpu_processes():
    cmd = launch_command("eval.py", ["a=1"], num_processes=2, main_process_port=29999)
    assert cmd[-2:] == ["eval.py", "a=1"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2" and "--cpu" not in cmd
