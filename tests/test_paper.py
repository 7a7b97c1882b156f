"""The paper-scale recipe without weights: the 7B architecture on the meta device, the parts of
each stage that need no real weights, and the paper's hyper-parameters in the shipped configs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from common.data import epoch_batches
from common.jsonl import read_jsonl
from common.launch import cpu_launch_env, launch_command
from common.models import QWEN2_5_VL_7B, QWEN3_VL_8B, load_model, meta_model, visual_tokens, zero3_memory_gib
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def model_7b():
    return meta_model(QWEN2_5_VL_7B)


def test_7b_on_meta_device_has_the_published_size_and_ids(model_7b):
    n = sum(p.numel() for p in model_7b.parameters())
    assert 8.25e9 < n < 8.33e9  # Qwen2.5-VL-7B: 8.29B
    ids = visual_tokens(model_7b.config)
    assert (ids.video, ids.image, ids.vision_start, ids.vision_end) == (151656, 151655, 151652, 151653)
    assert all(p.device.type == "meta" for p in model_7b.parameters())


def test_voyager_backbone_layers_and_attribution_modules_are_reachable(model_7b):
    layers = model_7b.model.language_model.layers
    assert len(layers) == 28 and layers[3].self_attn.q_proj.in_features == 3584
    assert model_7b.get_output_embeddings().weight.shape == (152064, 3584)
    assert model_7b.model.visual.merger is not None


def test_qwen3_vl_8b_on_meta_device_has_the_published_size_ids_and_deepstack():
    model = meta_model(QWEN3_VL_8B)
    n = sum(p.numel() for p in model.parameters())
    assert 8.70e9 < n < 8.80e9  # Qwen3-VL-8B: 8.77B
    ids = visual_tokens(model.config)
    assert (ids.video, ids.image, ids.vision_start, ids.vision_end) == (151656, 151655, 151652, 151653)
    assert len(model.model.language_model.layers) == 36 and model.get_output_embeddings().weight.shape == (151936, 4096)
    assert len(model.model.visual.deepstack_merger_list) == 3  # features of vision layers 8, 16, 24
    assert model.config.text_config.rope_parameters["mrope_interleaved"]


def test_plan_reads_a_checkpoint_config_or_a_published_arch(tiny_qwen3_vl_dir, capsys):
    from common.models import main

    main(["plan", "--model", str(tiny_qwen3_vl_dir), "--gpus", "2"])
    out = capsys.readouterr().out
    tiny = sum(p.numel() for p in load_model(tiny_qwen3_vl_dir).parameters())
    assert f"{tiny / 1e9:.2f}B parameters" in out and "GiB per GPU (2 GPUs)" in out
    main(["plan-7b", "--arch", "qwen3_vl"])
    assert "Qwen3-VL-8B: 8.77B parameters" in capsys.readouterr().out


def test_zero3_memory_estimate_fits_an_80gb_gpu(model_7b):
    n = sum(p.numel() for p in model_7b.parameters())
    trainable = n - sum(p.numel() for p in model_7b.model.visual.parameters())
    memory = zero3_memory_gib(n, trainable, gpus=8, with_reference=True)
    assert memory["total before activations"] == pytest.approx(sum(v for k, v in memory.items() if "total" not in k))
    assert 20 < memory["total before activations"] < 40


def test_paper_configs_carry_the_papers_hyperparameters():
    import train_ktr

    cfg = load_config(train_ktr.Config, ROOT / "configs" / "ktr.yaml", validate=False)
    assert (cfg.num_generations, cfg.lr, cfg.weight_decay, cfg.beta, cfg.max_new_tokens, cfg.max_grad_norm) == (
        8, 2e-6, 0.01, 0.04, 768, 5.0)
    assert cfg.signal_ratios == {"visual": 0.2, "temporal": 0.2, "entropy": 0.2}
    assert cfg.bf16 and cfg.temperature == 1.0 and cfg.top_p == 0.95 and cfg.top_k == 50 and cfg.kl_clamp == 10
    assert (cfg.reward.length_bonus, cfg.reward.length_min, cfg.reward.length_max, cfg.reward.length_unit) == (
        0.2, 320, 512, "tokens")
    assert (cfg.frames.strategy, cfg.frames.fps, cfg.frames.min_frames, cfg.frames.max_frames) == ("fps", 2.0, 4, 16)


def test_run_sh_paper_dry_run_names_missing_paths_and_plans(tmp_path):
    proc = subprocess.run(["bash", "run.sh", "paper", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "BASE_MODEL": str(tmp_path / "nope"),
                                            "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"missing: BASE_MODEL={tmp_path / 'nope'}" in proc.stderr
    assert "8.29B parameters" in proc.stdout and "GiB per GPU" in proc.stdout
    assert "train_ktr.py --config configs/ktr.yaml" in proc.stdout
    proc = subprocess.run(["bash", "run.sh", "paper", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PAPER_ARCH": "qwen3_vl", "HOME": str(tmp_path)})
    assert proc.returncode == 0 and "Qwen3-VL-8B: 8.77B parameters" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(["bash", "run.sh", "paper"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1 and "missing: RL_DATA=" in proc.stderr


def dry_run_stages(tmp_path) -> list[tuple[str, Path, object]]:
    """Each stage `run.sh paper --dry-run` would run: its name, done-marker and the stage's config as the script
    would load it (config file + the command line's overrides)."""
    import importlib

    proc = subprocess.run(["bash", "run.sh", "paper", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = []
    for line in proc.stdout.splitlines():
        if not line.startswith("stage "):
            continue
        words = line.split()
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        assert words[script + 1] == "--config", line
        module = importlib.import_module(words[script].removesuffix(".py"))
        cfg = load_config(module.Config, ROOT / words[script + 2], words[script + 3:], validate=False)
        stages.append((words[1], Path(words[2]), cfg))
    return stages


def test_run_sh_paper_stages_write_where_their_done_markers_are_and_read_what_earlier_stages_wrote(tmp_path):
    stages = dry_run_stages(tmp_path)
    names = [name for name, _, _ in stages]
    assert names[:5] == ["sft", "grpo", "ktr", "label", "voyager"], names
    written: set[Path] = set()
    for name, marker, cfg in stages:
        out = Path(cfg.output_dir)
        assert out.parts[:2] == ("outputs", "paper"), (name, out)
        assert out in marker.parents, f"stage {name}: marker {marker} is not under its output_dir {out}"
        if name != "sft":  # every later stage starts from a checkpoint an earlier stage wrote
            assert Path(cfg.model).parent in written, (name, cfg.model)
        if name == "voyager":
            assert Path(cfg.labels).parent in written
        if getattr(cfg, "frames", None) is not None and cfg.frames.strategy == "voyager":
            assert Path(cfg.frames.voyager) in written
        written.add(out)
    for benchmark in ("videomme", "mlvu"):  # Frame-Voyager's table: every strategy, 8 frames, the SFT model
        for strategy in ("uniform", "retrieval", "aks", "dpp", "voyager"):
            (cfg,) = [c for n, _, c in stages if n == f"eval_sft_{benchmark}_8_{strategy}"]
            assert (cfg.frames.strategy, cfg.frames.num, cfg.model) == (strategy, 8, "outputs/paper/sft/final")
            cfg.frames.validate()


PICKED = (1, 14, 21, 12, 25, 34, 36, 45)  # videos and images of every problem type; 25 is the truncated video


def paper_subset(video_r1_mix, tmp_path) -> tuple[dict, Path]:
    records = {r["problem_id"]: r for r in json.loads(video_r1_mix.read_text())}
    picked = [records[i] for i in PICKED]
    assert {r["problem_type"] for r in picked} == {"multiple choice", "numerical", "OCR", "free-form", "regression"}
    assert {r["data_type"] for r in picked} == {"video", "image"}
    data = tmp_path / "paper_subset.json"  # its media stay in the shared fixture's folder: media_root
    data.write_text(json.dumps(picked))
    return records, data


def paper_args(model, data, media_root, out, steps) -> list[str]:
    """configs/ktr.yaml with only the model, data, sizes, logging and attention overridden."""
    return ["--config", "configs/ktr.yaml", f"model={model}", f"data={data}", f"output_dir={out}",
            f"media_root={media_root}", "num_generations=3",
            "max_new_tokens=24", f"max_steps={steps}", "attn_implementation=sdpa", "save_every=0", "token_log_every=1"]


def test_shipped_ktr_config_trains_on_mixed_video_r1_data_in_bf16(answering_model_dir, video_r1_mix, tmp_path):
    """The first real run, rehearsed: configs/ktr.yaml as shipped (bf16, gradient checkpointing, 2 fps
    with 4..16 frames and the reference's pixel budgets, top-k 50, KL clamp, token length bonus,
    batch_size 1), with only the model, data, sizes and attention overridden, over Video-R1-shaped
    data: images and real mp4s of different sizes, every problem type, one truncated video."""
    records, data = paper_subset(video_r1_mix, tmp_path)
    out = tmp_path / "ktr"
    cmd = [sys.executable, "train_ktr.py", *paper_args(answering_model_dir, data, video_r1_mix.parent, out,
                                                             steps=len(PICKED))]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "1 process(es) on cpu" in proc.stdout
    # prefix_sharing as shipped: under checkpointing and bf16, its first-step check against the full forward ran
    gap = re.search(r"prefix_sharing: the first step's log-probs are within (\S+) per token", proc.stdout)
    assert gap and float(gap.group(1)) < 0.01, proc.stdout[-2000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == len(PICKED) - 1  # one epoch; the truncated video's step is skipped
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in metrics)
    assert metrics[0]["kl"] == 0.0  # bf16 everywhere: the reference equals the policy before the first update
    skipped = read_jsonl(out / "skipped.jsonl")
    assert [s["problem_id"] for s in skipped] == ["25"] and "truncated_160x120_24fps.mp4" in skipped[0]["error"]
    trained = {row["problem_id"] for row in read_jsonl(out / "tokens.jsonl")}
    assert trained == {str(i) for i in PICKED} - {"25"}  # never replaced by another sample
    rows = {row["problem_id"]: row for row in read_jsonl(out / "tokens.jsonl")}
    images = [pid for pid in trained if records[int(pid)]["data_type"] == "image"]
    assert all(all(s is None for s in rows[pid]["scores"]["temporal"]) for pid in images)
    assert any(any(s is not None for s in rows[pid]["scores"]["visual"]) for pid in images)
    model = load_model(out / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shipped_ktr_config_on_two_zero3_ranks_in_bf16_with_mixed_batches(answering_model_dir, video_r1_mix,
                                                                           tmp_path):
    """The same on 2 ZeRO-3 ranks in bf16 (the shipped zero3.yaml, gloo on CPU), batch_size 1 each: in
    a step one rank may hold an image and the other a video, completions differ in length, and when
    one rank meets the truncated video both skip that step together (no hang, nothing substituted)."""
    records, data = paper_subset(video_r1_mix, tmp_path)
    per_rank = [epoch_batches(len(PICKED), 1, 2, rank, 0, 0) for rank in (0, 1)]
    kinds = [[records[PICKED[batches[step][0]]]["data_type"] for batches in per_rank]
             for step in range(len(PICKED) // 2)]
    assert ["image", "video"] in kinds or ["video", "image"] in kinds, kinds  # the case this test is for
    out = tmp_path / "ktr2"
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    config.update(num_processes=2, use_cpu=False, mixed_precision="bf16")
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    cmd = launch_command("train_ktr.py", paper_args(answering_model_dir, data, video_r1_mix.parent, out,
                                                    steps=len(PICKED) // 2),
                         num_processes=2, accelerate_config=str(tmp_path / "zero3.yaml"), main_process_port=29661)
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(deepspeed=True), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "accelerate: DEEPSPEED ZeRO-3, 2 process(es) on cpu" in proc.stdout
    gap = re.search(r"prefix_sharing: the first step's log-probs are within (\S+) per token", proc.stdout)
    assert gap and float(gap.group(1)) < 0.01, proc.stdout[-2000:]  # both ranks' tokens, one decision
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == len(PICKED) // 2 - 1 and "skipped, a batch had no readable sample" in proc.stdout
    assert [s["problem_id"] for s in read_jsonl(out / "skipped.jsonl")] == ["25"]
    assert metrics[0]["kl"] == 0.0 and all(math.isfinite(m["loss"]) for m in metrics)
    trained = read_jsonl(out / "tokens.jsonl")
    assert {row["problem_id"] for row in trained} <= {str(i) for i in PICKED} - {"25"}
    assert load_model(out / "final") is not None
