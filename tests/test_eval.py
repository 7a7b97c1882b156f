"""eval.py end to end on the tiny model: outputs, multi-process equality, resume after a kill,
and broken videos reported while the rest is scored."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from common.jsonl import read_jsonl
from common.launch import cpu_launch_env, launch_command
from tests.conftest import ROOT


def eval_args(model, data, out, *extra):
    return [f"model={model}", f"data={data}", f"output_dir={out}", "frames.num=4", "batch_size=2",
            "max_new_tokens=48", *extra]


def run_eval(args, num_processes=1, port=None):
    if num_processes == 1:
        cmd = [sys.executable, "eval.py", *args]
    else:
        cmd = launch_command("eval.py", args, num_processes=num_processes, main_process_port=port)
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def predictions(out):
    return read_jsonl(out / "predictions.jsonl")


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    run_eval(eval_args(tiny_model_dir, tiny_world_dir / "test.json", out))
    return out


@pytest.fixture(scope="module")
def qwen3_vl_run(tiny_qwen3_vl_dir, tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_qwen3_vl")
    run_eval(eval_args(tiny_qwen3_vl_dir, tiny_world_dir / "test.json", out))
    return out


@pytest.fixture(scope="module")
def llava_onevision_run(tiny_llava_onevision_dir, tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_llava_onevision")
    run_eval(eval_args(tiny_llava_onevision_dir, tiny_world_dir / "test.json", out))
    return out


@pytest.mark.parametrize("run", ["single_run", "qwen3_vl_run", "llava_onevision_run"])
def test_outputs_have_every_sample_once_with_required_fields(run, request, tiny_world_dir):
    single_run = request.getfixturevalue(run)
    records = json.loads((tiny_world_dir / "test.json").read_text())
    rows = predictions(single_run)
    assert [r["problem_id"] for r in rows] == [str(r["problem_id"]) for r in records]
    for row in rows:
        assert {"output", "prediction", "reward", "correct", "frame_indices"} <= row.keys()
        assert len(row["frame_indices"]) == 4 and row["frame_indices"] == sorted(row["frame_indices"])
    summary = json.loads((single_run / "summary.json").read_text())
    assert summary["n"] == len(records) and summary["n_failed"] == 0
    assert summary["accuracy"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))
    assert set(summary["by_source"]["question_family"]) == {r["question_family"] for r in records}
    hits = [bool(set(r["frame_indices"]) & set(rec["evidence_frames"])) for r, rec in zip(rows, records, strict=True)]
    assert summary["evidence_recall"] == pytest.approx(sum(hits) / len(hits))
    assert (single_run / "config.yaml").exists()


def test_two_processes_merge_to_the_same_predictions_as_one(single_run, tiny_model_dir, tiny_world_dir, tmp_path):
    out = tmp_path / "eval2"
    run_eval(eval_args(tiny_model_dir, tiny_world_dir / "test.json", out), num_processes=2, port=29611)
    assert predictions(out) == predictions(single_run)
    assert not list(out.glob("predictions.rank*.jsonl"))


def test_killed_run_resumes_without_duplicates_or_broken_lines(single_run, tiny_model_dir, tiny_world_dir, tmp_path):
    out = tmp_path / "killed"
    args = eval_args(tiny_model_dir, tiny_world_dir / "test.json", out)
    proc = subprocess.Popen([sys.executable, "eval.py", *args], cwd=ROOT, env=cpu_launch_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "predictions.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(shard)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_jsonl(shard))
    assert 2 <= done_before < 8, "the kill should land mid-run"
    # Simulate the worst moment: a kill in the middle of writing a line.
    with open(shard, "a") as f:
        f.write('{"problem_id": "half')
    run_eval(args)
    rows = predictions(out)
    ids = [r["problem_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8
    assert rows == predictions(single_run)


def test_broken_videos_are_reported_and_the_rest_scored(tiny_model_dir, tiny_world_dir, tmp_path):
    data = tmp_path / "broken"
    shutil.copytree(tiny_world_dir, data)
    records = json.loads((data / "test.json").read_text())
    truncated, empty, missing = (data / r["path"] for r in records[:3])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    empty.write_bytes(b"")
    missing.unlink()
    out = tmp_path / "out"
    proc = run_eval(eval_args(tiny_model_dir, data / "test.json", out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 8 and summary["n_failed"] == 3
    errors = {f["problem_id"]: f["error"] for f in summary["failures"]}
    for record, path in zip(records[:3], (truncated, empty, missing), strict=True):
        assert str(path.name) in errors[str(record["problem_id"])]
    scored = [r for r in predictions(out) if not r.get("failed")]
    assert len(scored) == 5 and all("output" in r for r in scored)
    assert "failed: 3" in proc.stdout


def test_bad_config_stops_before_any_work(tiny_model_dir, tiny_world_dir, tmp_path):
    args = eval_args(tiny_model_dir, tmp_path / "nope.json", tmp_path / "o")
    proc = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data: no such file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_sampled_eval_is_seeded_and_records_its_decoding(single_run, tiny_model_dir, tiny_world_dir, tmp_path):
    data = tiny_world_dir / "test.json"
    sampling = ("temperature=1.0", "top_p=0.9", "top_k=40")
    outs = [tmp_path / name for name in ("a", "b", "seed1")]
    for out, seed in zip(outs, (0, 0, 1), strict=True):
        run_eval(eval_args(tiny_model_dir, data, out, *sampling, f"seed={seed}"))
    a, b, other = ([r["output"] for r in predictions(out)] for out in outs)
    assert a == b  # a rerun samples the same answers
    assert a != other and a != [r["output"] for r in predictions(single_run)]  # sampled, not greedy
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["decoding"] == {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 40,
                                   "max_new_tokens": 48, "seed": 0}
    greedy = json.loads((single_run / "summary.json").read_text())["decoding"]
    assert greedy == {"do_sample": False, "max_new_tokens": 48, "seed": 0}


@pytest.mark.parametrize("override, message", [("temperature=-0.1", "temperature: must be >= 0"),
                                               ("top_p=0", r"top_p: must be in \(0, 1\]"),
                                               ("top_k=-1", "top_k: must be >= 0"),
                                               ("frames.min_frames=-1", "frames.min_frames: must be >= 0"),
                                               ("frames.max_pixels=100", "frames.max_pixels: must be 0")])
def test_bad_decoding_or_frames_values_name_the_key(tiny_model_dir, tiny_world_dir, tmp_path, override, message):
    args = eval_args(tiny_model_dir, tiny_world_dir / "test.json", tmp_path / "o", override)
    proc = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-2000:]


def test_headroom_counts_sampled_mode_pass_and_zero_advantage():
    from eval import headroom

    rows = [  # greedy wrong, but the most frequent sample is right: room for RL to sharpen
        {"reward": 0.0, "sample_predictions": ["A", "A", "B"], "sample_rewards": [1.0, 1.0, 0.0]},
        # every sample wrong: a zero-advantage group
        {"reward": 1.0, "sample_predictions": ["C", "C", None], "sample_rewards": [0.0, 0.0, 0.0]}]
    assert headroom(rows) == pytest.approx({
        "n": 2, "num_samples": 3, "greedy_accuracy": 0.5, "sampled_accuracy": (2 / 3) / 2, "pass_at_k": 0.5,
        "mode_accuracy": 0.5, "zero_advantage_groups": 0.5})


def test_num_samples_adds_the_headroom_per_family(answering_model_dir, tiny_world_dir, tmp_path):
    out = tmp_path / "headroom"
    proc = run_eval(eval_args(answering_model_dir, tiny_world_dir / "test.json", out, "num_samples=4"))
    rows, summary = predictions(out), json.loads((out / "summary.json").read_text())
    assert all(len(r["sample_rewards"]) == len(r["sample_predictions"]) == 4 for r in rows)
    overall = summary["sampled"]["overall"]
    assert overall["sampled_accuracy"] == pytest.approx(sum(sum(r["sample_rewards"]) for r in rows) / (4 * len(rows)))
    assert overall["greedy_accuracy"] == pytest.approx(summary["accuracy"])
    assert set(summary["sampled"]["by_family"]) == {r["question_family"] for r in rows}
    assert summary["decoding"]["samples"] == {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "top_k": 0}
    assert "headroom for RL" in proc.stdout
