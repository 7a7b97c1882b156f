"""run.sh end to end at a small size: killed at fixed points and rerun, it finishes with the same
results as an uninterrupted run (which also checks that two runs give the same numbers)."""

import json
import os
import signal
import subprocess
import time

from tests.conftest import ROOT

SMALL = {"N_TRAIN": "16", "N_TEST": "8", "SFT_STEPS": "4", "N_LABEL": "8", "RL_STEPS": "2", "OMP_NUM_THREADS": "1"}


def start(out):
    return subprocess.Popen(["bash", "run.sh"], cwd=ROOT, env={**os.environ, **SMALL, "OUT": str(out)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_to_end(out) -> str:
    proc = start(out)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    return output


def kill_when(out, line_start: str) -> None:
    """Run until a stage announces itself with `line_start`, then kill run.sh and its child."""
    proc = start(out)
    for line in proc.stdout:
        if line.startswith(line_start):
            time.sleep(1.5)  # let the stage get going
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, f"the run ended before {line_start!r}"


def comparable(out) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in ("timings", "date")}


def test_killed_and_rerun_pipeline_gives_the_results_of_an_uninterrupted_run(tmp_path):
    run_to_end(tmp_path / "a")
    kill_when(tmp_path / "b", "== label:")
    kill_when(tmp_path / "b", "== eval_grpo:")
    output = run_to_end(tmp_path / "b")
    assert "== sft: done already" in output and "== label: done already" in output
    a, b = comparable(tmp_path / "a"), comparable(tmp_path / "b")
    assert set(a["qa"]) == {"sft", "grpo", "ktr"} and set(a["frame_selection"]) >= {"uniform", "retrieval", "voyager"}
    assert a == b
    assert (tmp_path / "b" / "RESULTS.md").read_text().count("|") > 20
