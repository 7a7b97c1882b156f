"""The paper-scale recipe without weights: the 7B architecture on the meta device, the parts of
each stage that need no real weights, and the paper's hyper-parameters in the shipped configs."""

import subprocess

import pytest

from common.config import load_config
from common.models import QWEN2_5_VL_7B, meta_model, visual_tokens, zero3_memory_gib
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
    assert cfg.frames.num == 16 and cfg.bf16 and cfg.temperature == 1.0 and cfg.top_p == 0.95


def test_run_sh_paper_dry_run_names_missing_paths_and_plans(tmp_path):
    proc = subprocess.run(["bash", "run.sh", "paper", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "BASE_MODEL": str(tmp_path / "nope"),
                                            "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"missing: BASE_MODEL={tmp_path / 'nope'}" in proc.stderr
    assert "8.29B parameters" in proc.stdout and "GiB per GPU" in proc.stdout
    assert "train_ktr.py --config configs/ktr.yaml" in proc.stdout
    proc = subprocess.run(["bash", "run.sh", "paper"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1 and "missing: RL_DATA=" in proc.stderr
