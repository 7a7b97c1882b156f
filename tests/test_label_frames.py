"""label_frames.py: the fast losses equal the straightforward ones, combination sampling, resume after
an interruption without duplicates, and broken videos recorded and skipped."""

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from itertools import combinations

import pytest
import torch

from common.data import build_prompt, load_samples
from common.jsonl import read_jsonl
from common.launch import cpu_launch_env
from common.models import load_model, load_processor
from common.video import read_frames
from label_frames import (
    CombinationLabeler,
    balanced_combinations,
    frame_weights,
    straightforward_losses,
    target_text,
)
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny(tiny_arch_dir):
    """The fast labeler is checked on every supported family."""
    torch.manual_seed(0)
    return load_model(tiny_arch_dir).eval(), load_processor(tiny_arch_dir)


@pytest.mark.parametrize("num_frames,target", [(4, "answer"), (3, "reasoning_answer")])
def test_fast_losses_equal_the_straightforward_processor_and_forward(tiny, tiny_world_dir, num_frames, target):
    """The second video is declared 4x slower, so its frames' times pass 10 s: where timestamps are text
    (Qwen3-VL), combinations then differ in their `<t seconds>` tokens and even in sequence length."""
    model, processor = tiny
    for sample, slow_down in zip(load_samples(tiny_world_dir / "train.json")[:2], (1, 4), strict=True):
        clip = read_frames(sample.path, num_frames=8)
        clip = dataclasses.replace(clip, fps=clip.fps / slow_down)
        prompt, text = build_prompt(sample), target_text(sample, target)
        combos = balanced_combinations(8, num_frames, 12, random.Random(0))
        fast = CombinationLabeler(model, processor, clip, prompt, text, num_frames).losses(combos, batch_size=5)
        slow = straightforward_losses(model, processor, clip, prompt, text, combos)
        assert max(abs(a - b) for a, b in zip(fast, slow, strict=True)) <= 1e-4
        assert max(slow) - min(slow) > 1e-4, "combinations should not all give the same loss"


def test_sampled_combinations_are_distinct_sorted_seeded_and_cover_frames_evenly():
    combos = balanced_combinations(16, 4, 64, random.Random(7))
    assert len(combos) == len(set(combos)) == 64
    assert all(list(c) == sorted(set(c)) and len(c) == 4 for c in combos)
    assert combos == balanced_combinations(16, 4, 64, random.Random(7))
    uses = torch.bincount(torch.tensor(combos).flatten(), minlength=16)
    assert uses.min() >= 12 and uses.max() <= 20  # 64 * 4 / 16 = 16 each, about
    # Asking for more than exist gives each combination once.
    assert sorted(balanced_combinations(5, 2, 100, random.Random(0))) == list(combinations(range(5), 2))


def test_refinement_weights_favour_frames_of_low_loss_combinations():
    combos = [(0, 1), (0, 2), (1, 2), (2, 3), (1, 3), (0, 3)]
    losses = [1.0, 1.0, 2.0, 2.0, 2.0, 1.0]  # every combination with frame 0 is better
    weights = frame_weights(combos, losses, 4)
    assert weights[0] == max(weights) and min(weights) > 0


def run_label(args):
    proc = subprocess.run([sys.executable, "label_frames.py", *args], cwd=ROOT, env=cpu_launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def broken_world(tiny_world_dir, tmp_path_factory):
    """The tiny world's train split with its 2nd video truncated and its 5th missing."""
    data = tmp_path_factory.mktemp("label_world")
    shutil.copytree(tiny_world_dir, data, dirs_exist_ok=True)
    records = json.loads((data / "train.json").read_text())
    truncated = data / records[1]["path"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    (data / records[4]["path"]).unlink()
    return data, [str(r["problem_id"]) for r in records]


def label_args(model, data, out, *extra):
    return [f"model={model}", f"data={data}", f"output_dir={out}", "candidates=8", "num_frames=2",
            "max_combinations=12", "batch_size=8", *extra]


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, broken_world, tmp_path_factory):
    data, _ = broken_world
    out = tmp_path_factory.mktemp("label_clean")
    run_label(label_args(tiny_model_dir, data / "train.json", out))
    return out


def test_broken_videos_are_recorded_with_the_reason_and_skipped(clean_run, broken_world):
    _, ids = broken_world
    labels = read_jsonl(clean_run / "labels.jsonl")
    skipped = {r["problem_id"]: r["reason"] for r in read_jsonl(clean_run / "skipped.jsonl")}
    assert set(skipped) == {ids[1], ids[4]} and "missing file" in skipped[ids[4]]
    assert [r["problem_id"] for r in labels] == [i for i in ids if i not in skipped]
    for row in labels:
        assert len(row["candidate_indices"]) == 8 and len(row["combinations"]) == len(row["losses"]) == 12
        assert all(len(c) == 2 and c[0] < c[1] for c in row["combinations"])
    summary = json.loads((clean_run / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["skipped"] == 2 and summary["combinations"] == 72


def test_interrupted_run_resumes_with_every_sample_once(clean_run, tiny_model_dir, broken_world, tmp_path):
    data, ids = broken_world
    reference = read_jsonl(clean_run / "labels.jsonl")
    out = tmp_path / "resumed"
    out.mkdir()
    # What a kill leaves: two whole lines in the shard and a third cut off mid-write.
    shard = out / "labels.rank0.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in reference[:2]) + json.dumps(reference[2])[:40])
    run_label(label_args(tiny_model_dir, data / "train.json", out))
    rows = read_jsonl(out / "labels.jsonl")
    assert [r["problem_id"] for r in rows] == [r["problem_id"] for r in reference]
    for got, want in zip(rows, reference, strict=True):
        assert got["combinations"] == want["combinations"]
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-5)
    assert not list(out.glob("*.rank*.jsonl"))


def test_flat_samples_are_filtered_by_loss_spread(tiny_model_dir, broken_world, tmp_path):
    data, _ = broken_world
    out = tmp_path / "filtered"
    run_label(label_args(tiny_model_dir, data / "train.json", out, "min_loss_spread=1000.0", "limit=3"))
    assert read_jsonl(out / "labels.jsonl") == []
    reasons = [r["reason"] for r in read_jsonl(out / "skipped.jsonl")]
    assert len(reasons) == 3 and sum("flat losses" in r for r in reasons) == 2


def test_mixed_candidates_label_each_sample_at_its_own_m_as_a_single_m_run_would(clean_run, tiny_model_dir,
                                                                                broken_world, tmp_path):
    from common.config import ConfigError
    from label_frames import Config, sample_candidates

    data, _ = broken_world
    out = tmp_path / "mixed"
    run_label(label_args(tiny_model_dir, data / "train.json", out, "mixed_candidates=[4, 8]"))
    rows = read_jsonl(out / "labels.jsonl")
    cfg = Config(candidates=8, num_frames=2, mixed_candidates=[4, 8])
    reference = {r["problem_id"]: r for r in read_jsonl(clean_run / "labels.jsonl")}
    assert [r["problem_id"] for r in rows] == list(reference)  # the same samples, the broken ones skipped
    sizes = [len(r["candidate_indices"]) for r in rows]
    assert sizes == [sample_candidates(cfg, r["problem_id"]) for r in rows] and set(sizes) == {4, 8}
    for row in rows:
        if len(row["candidate_indices"]) == 4:  # C(4, 2) = 6 <= 12: every combination
            assert sorted(map(tuple, row["combinations"])) == list(combinations(range(4), 2))
            assert row["candidate_indices"] == read_frames(row["path"], num_frames=4).indices
        else:  # what the run at candidates=8 labeled for this sample
            want = reference[row["problem_id"]]
            assert row["candidate_indices"] == want["candidate_indices"]
            assert row["combinations"] == want["combinations"]
            assert row["losses"] == pytest.approx(want["losses"], abs=1e-5)
    # A scorer trained on them records every M, and as `candidates` the most common one.
    proc = subprocess.run([sys.executable, "train_voyager.py", f"labels={out / 'labels.jsonl'}",
                           f"output_dir={tmp_path / 'voyager'}", "layers=1", "dim=16", "epochs=1", "batch_size=4",
                           "val_fraction=0.25"], cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    spec = json.loads((tmp_path / "voyager" / "voyager.json").read_text())
    assert spec["candidate_sizes"] == [4, 8] and spec["candidates"] == max((4, 8), key=sizes.count)
    with pytest.raises(ConfigError, match=r"mixed_candidates.*M=1 must be >= num_frames T=2"):
        dataclasses.replace(cfg, model=str(tiny_model_dir), data=str(data / "train.json"),
                            mixed_candidates=[8, 1]).validate()
