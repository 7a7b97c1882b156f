"""train_ktr.py end to end on the tiny model: outputs a researcher reads, resume equals an
uninterrupted run, multi-process replicas stay identical, bad config stops before any work."""

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.jsonl import read_jsonl
from common.launch import cpu_launch_env, launch_command
from tests.conftest import ROOT
from tests.test_report import check_page


def ktr_args(model, data, out, *extra):
    return [f"model={model}", f"data={data}", f"output_dir={out}", "frames.num=4", "num_generations=3",
            "max_new_tokens=10", "batch_size=2", "max_steps=4", "lr=1e-3", "beta=0.04", "html_samples=4", *extra]


def run(args, num_processes=1, config=None, port=None, expect=0):
    script_args = (["--config", str(config)] if config else []) + list(args)
    if num_processes == 1 and config is None:
        cmd = [sys.executable, "train_ktr.py", *script_args]
    else:
        cmd = launch_command("train_ktr.py", script_args, num_processes=num_processes, main_process_port=port)
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def weights_of(model_dir):
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def full_run(answering_model_dir, tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ktr_full")
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "save_every=2"))
    return out


def test_metrics_tokens_and_attribution_page_are_written(full_run):
    metrics = read_jsonl(full_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "reward/accuracy", "reward/format", "accuracy", "kl", "completion_length",
                "selected/union", "selected/visual", "selected/temporal", "selected/entropy",
                "overlap/temporal_visual", "all_correct_groups", "all_wrong_groups", "lr", "grad_norm",
                "time/generation", "time/attribution", "time/update"):
        assert key in metrics[0], key
    assert all(0 < m["selected/union"] <= 1 for m in metrics)
    for m in metrics:  # KTR logs the share of GRPO's per-token gradient its tokens keep; the union keeps the most
        shares = {k: m[f"gradient_share/{k}"] for k in ("visual", "temporal", "entropy", "union")}
        assert all(0 <= v <= 1 for v in shares.values()) and shares["union"] == max(shares.values()), m
    rows = read_jsonl(full_run / "tokens.jsonl")
    assert len(rows) == 4 * 2 * 3  # steps x prompts x generations
    assert all(len(r["selected"]["visual"]) == len(r["tokens"]) for r in rows)
    assert all("data:" not in json.dumps(r) and r["advantage"] is not None for r in rows)  # text only
    # html_samples=4 with G=3: whole groups, the last 2 prompts (6 completions), each with its 4 frames
    page = (full_run / "attribution.html").read_text()
    parsed = check_page(page, group_size=3, n_frames=4, signals={"visual", "temporal", "entropy"})
    assert len(parsed.groups) == 2 and all(g["order"] is not None for g in parsed.groups)
    assert page.count('class="sample"') == 6 and "title=" in page
    assert json.loads((full_run / "replicas.json").read_text())["agree"]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(full_run, answering_model_dir, tiny_world_dir,
                                                                 tmp_path):
    out = tmp_path / "resumed"
    args = ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "save_every=2")
    run([*args, "stop_after=3"])
    assert not (out / "final").exists() and (out / "checkpoints" / "step_000003" / "progress.json").exists()
    shutil.rmtree(out / "checkpoints" / "step_000003")  # as if killed after step 3 was logged, before its checkpoint
    proc = run(args)
    assert "resumed from" in proc.stdout + proc.stderr
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == [m["step"] for m in read_jsonl(full_run / "metrics.jsonl")] == list(range(1, len(steps) + 1))
    token_steps = [[r["step"] for r in read_jsonl(d / "tokens.jsonl")] for d in (out, full_run)]
    assert token_steps[0] == token_steps[1]
    ours, reference = weights(out), weights(full_run)
    assert ours.keys() == reference.keys()
    for name in reference:
        assert (ours[name] == reference[name]).all(), name
    assert read_jsonl(out / "metrics.jsonl")[-1] == read_jsonl(full_run / "metrics.jsonl")[-1] | {
        k: v for k, v in read_jsonl(out / "metrics.jsonl")[-1].items() if k.startswith("time/")}


def test_prefix_sharing_trains_as_the_full_forward_does(answering_model_dir, tiny_world_dir, tmp_path):
    """prefix_sharing=true (the policy and reference passes run each prompt once): 4 GRPO steps give the same
    rewards and, up to float rounding, the same KL, loss and weights as the full forward, also under gradient
    checkpointing (whose backward replays every layer, KV cache calls included). (With KTR's signals on, a
    selection quantile can fall between two scores that differ by rounding only.)"""
    grpo = ["attribution.visual=false", "attribution.temporal=false", "attribution.entropy=false"]
    runs, logs = {}, {}
    for name, extra in (("full", ["prefix_sharing=false"]), ("shared", ["prefix_sharing=true"]),
                        ("checkpointed", ["prefix_sharing=true", "gradient_checkpointing=true"])):
        runs[name] = tmp_path / name
        logs[name] = run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", runs[name], *grpo, *extra)).stdout
    full = read_jsonl(runs["full"] / "metrics.jsonl")
    assert "prefix_sharing:" not in logs["full"]
    before, a = weights_of(answering_model_dir), weights(runs["full"])
    assert any(not torch.equal(before[n], t) for n, t in a.items())
    assert max(m["kl"] for m in full) > 1e-4  # the reference pass mattered
    for name in ("shared", "checkpointed"):
        gap = re.search(r"prefix_sharing: the first step's log-probs are within (\S+) per token", logs[name])
        assert gap and float(gap.group(1)) < 1e-5, logs[name][-2000:]  # the run's own check against the full pass
        shared = read_jsonl(runs[name] / "metrics.jsonl")
        assert [m["reward"] for m in full] == [m["reward"] for m in shared]  # the same completions were sampled
        assert shared[0]["kl"] == 0.0  # policy = reference before the first update, computed the same way
        for key in ("kl", "loss", "grad_norm"):
            np.testing.assert_allclose([m[key] for m in shared], [m[key] for m in full], rtol=1e-3, atol=1e-6,
                                       err_msg=f"{name}: {key}")
        b = weights(runs[name])
        for key, tensor in a.items():
            torch.testing.assert_close(b[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_grpo_config_selects_every_token(answering_model_dir, tiny_world_dir, tmp_path):
    out = tmp_path / "grpo"
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "max_steps=1", "attribution.visual=false",
                 "attribution.temporal=false", "attribution.entropy=false"))
    metrics = read_jsonl(out / "metrics.jsonl")[0]
    assert metrics["selected/union"] == 1.0 and "selected/visual" not in metrics
    assert not any(k.startswith("gradient_share/") for k in metrics)  # plain GRPO keeps all of it


def cpu_accelerate_config(tmp_path, name: str, deepspeed: bool = False, num_processes: int | None = None) -> str:
    """One of the shipped configs/accelerate files for this CPU machine in float32: 2 processes, or
    for DeepSpeed 1 by default (accelerate starts DeepSpeed only when not told to use the CPU)."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / name).read_text())
    processes = num_processes or (1 if deepspeed else 2)
    config.update(num_processes=processes, use_cpu=not deepspeed, mixed_precision="no")
    path = tmp_path / f"{processes}_{name}"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_two_processes_train_and_keep_replicas_identical(answering_model_dir, tiny_world_dir, tmp_path):
    out = tmp_path / "dist"
    proc = run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "max_steps=3", "batch_size=1"),
               num_processes=2, port=29633)
    assert "accelerate: MULTI_CPU, 2 process(es)" in proc.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    assert any(m["grad_norm"] > 0 for m in metrics), "no step had a gradient: the test would prove nothing"
    # the reference equals the policy before the first update: KL 0, then the policy moves away
    assert abs(metrics[0]["kl"]) < 1e-6 and any(m["kl"] > 1e-6 for m in metrics[1:]), [m["kl"] for m in metrics]
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas["param_checksums"]) == 2 and replicas["agree"]


@pytest.mark.parametrize(("accelerate_config", "stage"), [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_configs_train(answering_model_dir, tiny_world_dir, tmp_path, accelerate_config, stage):
    """The shipped DeepSpeed configs, really through DeepSpeed (its CPU accelerator, one process:
    see common.launch.make_accelerator): the engine steps, ZeRO-3 gathers the weights to generate,
    shards the reference model, and the saved model is whole."""
    out = tmp_path / "ds"
    args = ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "max_steps=3", "batch_size=1")
    cmd = launch_command("train_ktr.py", args, num_processes=1, main_process_port=29634 + stage,
                         accelerate_config=cpu_accelerate_config(tmp_path, accelerate_config, deepspeed=True))
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(deepspeed=True), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"accelerate: DEEPSPEED ZeRO-{stage}, 1 process(es) on cpu" in proc.stdout
    assert "shm_comm" not in proc.stdout + proc.stderr  # the CPU-only op is not compiled (common.launch)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert abs(metrics[0]["kl"]) < 1e-6 and any(m["kl"] > 1e-6 for m in metrics[1:]), [m["kl"] for m in metrics]
    if stage == 3:
        assert re.search(r"reference model sharded by ZeRO-3: \d+ of \d+ parameters", proc.stdout)
    # the saved model is the loaded checkpoint moved by 3 Adam steps of lr 1e-3 (a mis-loaded or
    # mis-saved model would differ everywhere, by far more)
    before, after = weights_of(answering_model_dir), weights(out)
    assert before.keys() == after.keys() and all(after[k].shape == before[k].shape for k in before)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 0.01, moved


@pytest.mark.parametrize(("override", "key"), [("attribution.visual_ratio=-0.1", "attribution.visual_ratio"),
                                               ("num_generations=1", "num_generations"),
                                               ("data=/no/such.json", "data")])
def test_bad_config_values_stop_before_any_work(answering_model_dir, tiny_world_dir, tmp_path, override, key):
    out = tmp_path / "bad"
    proc = run([*ktr_args(answering_model_dir, tiny_world_dir / "train.json", out), override], expect=2)
    assert f"{key}:" in proc.stderr and not out.exists()


def test_a_family_that_tiles_images_apart_stops_at_the_first_image_prompt(tiny_llava_onevision_dir, tiny_world_dir,
                                                                          tmp_path):
    """LLaVA-OneVision tiles images "anyres" through a tower path of their own, so the rollout passes take its
    video prompts only: data holding an image stops right after loading the model, naming the property and
    the record, not deep inside a pass."""
    from PIL import Image

    image = tmp_path / "still.png"
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(image)
    records = json.loads((tiny_world_dir / "train.json").read_text())[:3]
    records.append({**records[0], "problem_id": "still-1", "data_type": "image", "path": str(image)})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "llava"
    proc = run(ktr_args(tiny_llava_onevision_dir, data, out, f"media_root={tiny_world_dir}"), expect=1)
    assert "visual_layout(model).image_grids is False" in proc.stderr
    assert "'still-1'" in proc.stderr and str(image) in proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("arch_dir", ["tiny_qwen3_vl_dir", "tiny_llava_onevision_dir"])
def test_family_trains_end_to_end_with_every_signal(arch_dir, tiny_world_dir, tmp_path, request):
    """Qwen3-VL (times as text, DeepStack, interleaved M-RoPE) and LLaVA-OneVision (no grids, 1-D positions, a
    newline after each video) through the whole stage: a few SFT steps so that groups have reward variance,
    then KTR steps whose three signals select tokens, whose page shows each sample's frames, and whose
    update moves the language model."""
    model_dir = request.getfixturevalue(arch_dir)
    sft = tmp_path / "sft"
    subprocess.run([sys.executable, "train_sft.py", f"model={model_dir}",
                    f"data={tiny_world_dir / 'train.json'}", f"output_dir={sft}", "frames.num=4", "batch_size=8",
                    "max_steps=30", "lr=3e-3", "with_reasoning=false"],
                   cwd=ROOT, env=cpu_launch_env(), check=True, capture_output=True)
    out = tmp_path / "ktr"
    run(ktr_args(sft / "final", tiny_world_dir / "train.json", out, "max_steps=2"))
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["kl"]) for m in metrics)
    for signal in ("visual", "temporal", "entropy"):
        assert 0 < metrics[0][f"selected/{signal}"] <= 0.5, signal
    scores = [x for row in read_jsonl(out / "tokens.jsonl") for x in row["scores"]["temporal"]]
    assert any(abs(x) > 1e-4 for x in scores)  # shuffled frames (with their DeepStack features) change log-probs
    check_page((out / "attribution.html").read_text(), group_size=3, n_frames=4,
               signals={"visual", "temporal", "entropy"})
    if any(m["reward_std"] > 0 for m in metrics):  # an update only happens where a group's rewards differ
        before, after = weights_of(sft / "final"), weights(out)
        assert any(not torch.equal(before[k], after[k]) for k in after if "language_model" in k)


def test_variants_run_pixel_removal_segment_shuffle_sequence_scope_token_mean(answering_model_dir, tiny_world_dir,
                                                                               tmp_path):
    out = tmp_path / "variants"
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "max_steps=1",
                 "attribution.visual_removal=pixels", "attribution.temporal_mode=segment_shuffle",
                 "attribution.score=absolute", "attribution.scope=sequence", "aggregation=token_mean",
                 "num_iterations=2", "epsilon_high=0.28", "kl_clamp=10", "reward.length_bonus=0.2",
                 "reward.length_unit=tokens", "reward.length_min=1", "reward.length_max=8"))
    metrics = read_jsonl(out / "metrics.jsonl")[0]
    for signal in ("visual", "temporal", "entropy"):
        assert 0 < metrics[f"selected/{signal}"] <= 0.5, signal


def test_frame_shuffle_counterfactual_runs_and_selects_temporal_tokens(answering_model_dir, tiny_world_dir,
                                                                        tmp_path):
    out = tmp_path / "frame_shuffle"
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "max_steps=1",
                 "attribution.temporal_mode=frame_shuffle"))
    metrics = read_jsonl(out / "metrics.jsonl")[0]
    assert 0 < metrics["selected/temporal"] <= 0.5
    scores = [x for row in read_jsonl(out / "tokens.jsonl") for x in row["scores"]["temporal"]]
    assert any(abs(x) > 1e-4 for x in scores)  # the re-encoded shuffled frames changed the log-probs
    page = check_page((out / "attribution.html").read_text(), group_size=3, n_frames=4,
                      signals={"visual", "temporal", "entropy"})
    assert all(g["order"] != [0, 1, 2, 3] for g in page.groups)  # single frames in their shuffled order


def test_dynamic_sampling_replaces_zero_advantage_groups(answering_model_dir, tiny_world_dir, tmp_path):
    """DAPO's dynamic sampling: groups whose rewards are all equal are replaced by fresh prompts' groups;
    with Dr. GRPO's unscaled advantages as well (both switches at once keeps the suite short)."""
    out = tmp_path / "dapo"
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "dynamic_sampling=3",
                 "scale_advantages=false", "attribution.visual=false", "attribution.temporal=false",
                 "attribution.entropy=false"))
    metrics = read_jsonl(out / "metrics.jsonl")
    sampled = [m["zero_advantage_groups_sampled"] for m in metrics]
    kept = [m["all_correct_groups"] + m["all_wrong_groups"] for m in metrics]
    assert any(s > 0 for s in sampled), "no zero-advantage group was sampled: the test would prove nothing"
    assert all(k <= s for k, s in zip(kept, sampled, strict=True))
    assert any(m["dynamic_sampling_rounds"] > 0 and k < s for m, k, s in zip(metrics, kept, sampled, strict=True))
    assert all(m["dynamic_sampling_rounds"] <= 3 for m in metrics)


def test_zero3_on_two_ranks_with_different_lengths_saves_what_ddp_saves(answering_model_dir, tiny_world_dir,
                                                                          tmp_path):
    """Real ZeRO-3 sharding across 2 processes (the shipped zero3.yaml, gloo on CPU): the ranks sample
    completions of different lengths, yet make the same sequence of sharded calls (no hang), and
    the saved model equals the one plain DDP saves after the same steps (same seeds and prompts).
    With chunks of 4 positions, unpadded lengths would give the ranks different numbers of
    output-layer calls: measured, gloo then fails with "collective mismatch". Dynamic sampling makes
    the ranks sample different numbers of rounds, which must not matter either. Both runs use the full forward
    over all B*G rows in the loss passes (`prefix_sharing=false`); the shipped configs, which share each
    prompt's KV cache, run 2 ZeRO-3 ranks in test_paper.py."""
    args = ktr_args(answering_model_dir, tiny_world_dir / "train.json", tmp_path / "x", "max_steps=3", "batch_size=1",
                    "max_new_tokens=16", "attribution.chunk_size=4", "dynamic_sampling=2", "prefix_sharing=false")
    ddp, zero3 = tmp_path / "ddp", tmp_path / "zero3"
    run([*args, f"output_dir={ddp}"], num_processes=2, port=29641)
    cmd = launch_command("train_ktr.py", [*args, f"output_dir={zero3}"], num_processes=2, main_process_port=29642,
                         accelerate_config=cpu_accelerate_config(tmp_path, "zero3.yaml", deepspeed=True,
                                                                 num_processes=2))
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(deepspeed=True), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "accelerate: DEEPSPEED ZeRO-3, 2 process(es) on cpu" in proc.stdout
    assert re.search(r"reference model sharded by ZeRO-3: (\d+) of (\d+) parameters", proc.stdout)
    local, total = map(int, re.search(r"sharded by ZeRO-3: (\d+) of (\d+)", proc.stdout).groups())
    assert local < total, "the parameters were not sharded across the 2 ranks"
    metrics = read_jsonl(zero3 / "metrics.jsonl")
    assert any(len(set(m["completion_length_by_rank"])) > 1 for m in metrics), \
        [m["completion_length_by_rank"] for m in metrics]
    assert [m["completion_length_by_rank"] for m in metrics] == [m["completion_length_by_rank"]
                                                                 for m in read_jsonl(ddp / "metrics.jsonl")]
    assert any(m["dynamic_sampling_rounds"] > 0 for m in metrics)
    # The same losses and gradients step by step (a missing or doubled gradient average would show here) ...
    for ours, reference in zip(metrics, read_jsonl(ddp / "metrics.jsonl"), strict=True):
        assert ours["kl"] == pytest.approx(reference["kl"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-2)
    assert metrics[0]["grad_norm"] == pytest.approx(read_jsonl(ddp / "metrics.jsonl")[0]["grad_norm"], rel=1e-4)
    # ... and the same saved model. Adam moves every weight by about lr per step whatever the size of its
    # gradient, so gradients that differ by float noise around 0 can move a few weights in opposite
    # directions: compare each tensor's mean difference with how far it moved (measured: <= 3 %).
    ours, reference, start = weights(zero3), weights(ddp), weights_of(answering_model_dir)
    assert ours.keys() == reference.keys()
    moved = {k: (reference[k] - start[k]).abs().mean().item() for k in start}
    assert max(moved.values()) > 1e-4, "DDP did not train"
    for name, distance in moved.items():
        if distance > 0:  # frozen tensors (the vision tower) stay equal to the start in both
            assert (ours[name] - reference[name]).abs().mean().item() < 0.1 * distance, name
        else:
            assert torch.equal(ours[name], start[name]), name


def test_scheduler_steps_once_per_rollout_batch(answering_model_dir, tiny_world_dir, tmp_path):
    """With num_iterations=2 (two updates per rollout) the cosine schedule still spans max_steps."""
    out = tmp_path / "iters"
    run(ktr_args(answering_model_dir, tiny_world_dir / "train.json", out, "num_iterations=2", "lr=1e-3",
                 "attribution.visual=false", "attribution.temporal=false", "attribution.entropy=false"))
    lrs = [m["lr"] for m in read_jsonl(out / "metrics.jsonl")]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(1, 5)]
    assert lrs == pytest.approx(expected, abs=1e-12), lrs
