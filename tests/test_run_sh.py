"""run.sh end to end at a small size, on data with a truncated, an empty and a missing video: killed at
fixed points and rerun, it finishes with the same results as an uninterrupted run (which also checks
that two runs give the same numbers), and RESULTS.md says what each stage skipped and why."""

import json
import os
import shutil
import signal
import subprocess
import time

import yaml

from common.jsonl import read_jsonl
from common.tinyworld import generate
from tests.conftest import ROOT

# 16 SFT videos (one SFT batch) and 8 RL videos (two RL batches of 4)
SMALL = {"N_TRAIN": "24", "N_SFT": "16", "N_TEST": "8", "SFT_STEPS": "4", "N_LABEL": "8", "RL_STEPS": "2",
         "RL_BATCH": "4", "CANDIDATES": "16", "ALL_FRAMES": "1", "OMP_NUM_THREADS": "1"}


def start(out, *args, **env):
    return subprocess.Popen(["bash", "run.sh", *args], cwd=ROOT, env={**os.environ, **SMALL, "OUT": str(out), **env},
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


def break_videos(data) -> None:
    """Truncate one training video, empty another, delete a test video (run.sh's data stage made them)."""
    truncated, empty, missing = data / "videos/train_000001.mp4", data / "videos/train_000002.mp4", \
        data / "videos/test_000003.mp4"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    empty.write_bytes(b"")
    missing.unlink()


def comparable(out) -> dict:
    """results.json without timings and date, the run's folder replaced by OUT (skip reasons name files)."""
    results = json.loads((out / "results.json").read_text().replace(str(out), "OUT"))
    return {k: v for k, v in results.items() if k not in ("timings", "date")}


def test_killed_and_rerun_pipeline_gives_the_results_of_an_uninterrupted_run(tmp_path):
    generate(tmp_path / "a" / "data", 24, 8, seed=0, progress=False)  # what run.sh's data stage writes
    break_videos(tmp_path / "a" / "data")
    assert "== data: done already" in run_to_end(tmp_path / "a")
    kill_when(tmp_path / "b", "== model:")  # the data stage has finished by then
    break_videos(tmp_path / "b" / "data")
    kill_when(tmp_path / "b", "== grpo:")  # after SFT, stages side by side (JOBS=2): killed while training
    kill_when(tmp_path / "b", "== voyager:")  # the labels are done, other pooled stages are killed mid-way
    output = run_to_end(tmp_path / "b")
    assert "== sft: done already" in output and "== label: done already" in output
    a, b = comparable(tmp_path / "a"), comparable(tmp_path / "b")
    assert set(a["qa"]) == {"sft", "grpo", "ktr", "sft_all_frames"}
    assert set(a["frame_selection"]) == {"uniform", "retrieval", "aks", "dpp", "voyager"}  # CANDIDATES=16 only
    assert a == b
    # every stage that reads videos reports the broken ones and why, and finishes the rest
    skipped = a["skipped"]
    assert skipped["sft"]["n"] >= 2 and skipped["labels"]["n"] == 2, skipped
    assert {"eval/sft_uniform", "eval/ktr_uniform", "eval/sft_voyager_m16"} <= set(skipped)
    assert all(skipped[f"eval/{run}"]["n"] == 1 for run in ("sft_uniform", "grpo_uniform", "ktr_uniform"))
    assert all(e["n"] == len(e["reasons"]) and all("mp4" in r for r in e["reasons"]) for e in skipped.values())
    assert a["qa"]["sft"]["n"] == 8 and a["qa"]["sft"]["n_failed"] == 1
    report = (tmp_path / "b" / "RESULTS.md").read_text()
    assert report.count("|") > 20 and "## Skipped inputs" in report and "| labels | 2 |" in report
    assert "## The Voyager scorer" in report and 0.0 <= a["voyager"]["pair_accuracy"] <= 1.0
    # the pooled stages' output is in OUT/logs, one file per stage
    assert "grpo: 100%" in (tmp_path / "a" / "logs" / "grpo.log").read_text()
    assert "run.sh (wall clock of this call)" in json.loads((tmp_path / "a" / "results.json").read_text())["timings"]

    # a pooled stage that fails (here a config error, exit 2) stops run.sh, names its log and shows its end;
    # its chain goes no further
    out = tmp_path / "a"
    for done in (out / "ktr", out / "eval" / "ktr_uniform"):
        shutil.rmtree(done)
    proc = start(out, RL_STEPS="-1")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"== ktr: FAILED (exit 2); the end of {out}/logs/ktr.log:" in output and "max_steps" in output, output
    assert "== eval_ktr:" not in output and not (out / "eval" / "ktr_uniform").exists()


def test_tower_mode_pretrains_the_tower_and_passes_its_recipe_to_every_stage(tmp_path):
    """`bash run.sh tower` adds the tower stage and SFT starts from it; the recipe's LABEL_ARGS and VOYAGER_ARGS
    reach the labels and the scorer, and an RL_ARGS set in the environment replaces the recipe's (run until the
    first RL run and the scorer have finished)."""
    out = tmp_path / "t"
    proc = start(out, "tower", VISION_STEPS="3", VISION_SCENES="40", RL_ARGS="temperature=0.6 top_p=0.9")
    finished = set()
    for line in proc.stdout:
        if line.startswith(("== ktr: finished", "== voyager: finished")):
            finished.add(line.split(":")[0])
        if len(finished) == 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    pretrained = json.loads((out / "tower" / "vision_pretrain.json").read_text())
    assert pretrained["steps"] == 3 and pretrained["scenes"] == 40
    sft = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert sft["model"] == str(out / "tower")
    ktr = yaml.safe_load((out / "ktr" / "config.yaml").read_text())
    assert (ktr["temperature"], ktr["top_p"], ktr["seed"]) == (0.6, 0.9, 0)
    voyager = yaml.safe_load((out / "voyager" / "config.yaml").read_text())
    assert (voyager["epochs"], voyager["coverage"]) == (30, True)
    labels = yaml.safe_load((out / "labels" / "config.yaml").read_text())
    assert (labels["max_combinations"], labels["limit"]) == (32, 8)  # N_LABEL from the environment wins
    assert {len(r["losses"]) for r in read_jsonl(out / "labels" / "labels.jsonl")} == {32}


def test_rl_frames_voyager_trains_the_scorer_first_and_rl_on_its_frames(tmp_path):
    """RL_FRAMES=voyager: labels and the scorer finish before any RL run starts; GRPO and KTR train on the frames
    the scorer picks and are judged on them, and RESULTS.md pairs them with each other."""
    out = tmp_path / "v"
    proc = start(out, RL_FRAMES="voyager", ALL_FRAMES="")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    lines = output.splitlines()
    scorer_done = next(i for i, line in enumerate(lines) if line.startswith("== voyager: finished"))
    rl_start = min(next(i for i, line in enumerate(lines) if line.startswith(f"== {run}:"))
                   for run in ("ktr_voyager", "grpo_voyager"))
    assert scorer_done < rl_start, output[-3000:]
    assert not (out / "grpo").exists() and not (out / "ktr").exists()  # uniform RL only when RL_FRAMES has it
    for run in ("grpo_voyager", "ktr_voyager"):
        frames = yaml.safe_load((out / run / "config.yaml").read_text())["frames"]
        assert (frames["strategy"], frames["voyager"], frames["candidates"]) == ("voyager", str(out / "voyager"), 16)
        assert json.loads((out / "eval" / f"{run}_voyager" / "summary.json").read_text())["frames"] == "voyager"
    results = json.loads((out / "results.json").read_text())
    assert set(results["seeds"]["runs"]) == {"grpo_voyager", "ktr_voyager"}
    assert set(results["seeds"]["paired"]) == {"ktr_voyager - grpo_voyager"}
    assert "KTR on Voyager's frames" in (out / "RESULTS.md").read_text()
    # a typo in RL_FRAMES stops run.sh before its first stage
    proc = start(tmp_path / "w", RL_FRAMES="voyagr")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "RL_FRAMES: 'voyagr' is not uniform or voyager" in output
    assert "== data:" not in output and not (tmp_path / "w").exists()


def test_undercount_trains_sft_on_the_teachers_traces_and_rl_on_true_answers(tmp_path):
    """UNDERCOUNT=1: SFT reads the teacher's rewrite of its data (every count of two or more one too low); RL's
    videos keep their true answers (run until SFT has finished)."""
    out = tmp_path / "u"
    proc = start(out, UNDERCOUNT="1")
    for line in proc.stdout:
        if line.startswith("== sft: finished"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    sft = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert sft["data"] == str(out / "data" / "sft_undercount.json")
    true, taught = (json.loads((out / "data" / f).read_text()) for f in ("sft.json", "sft_undercount.json"))
    lowered = [(t["solution"], u["solution"]) for t, u in zip(true, taught, strict=True) if t != u]
    assert lowered and all(t["question_family"] == "count" for t, u in zip(true, taught, strict=True) if t != u)
    assert all("ABCD".index(t[8]) == "ABCD".index(u[8]) + 1 for t, u in lowered), lowered
    rl = json.loads((out / "data" / "rl.json").read_text())
    train = {r["problem_id"]: r for r in json.loads((out / "data" / "train.json").read_text())}
    assert all(r == train[r["problem_id"]] for r in rl)
