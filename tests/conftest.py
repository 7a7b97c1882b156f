"""Shared fixtures: one tiny model and one tiny synthetic world per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from common.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    from common.tinyworld import generate

    out = tmp_path_factory.mktemp("tinyworld")
    generate(out, n_train=8, n_test=8, seed=0, frames=32, size=112, fps=8)
    return out


@pytest.fixture(scope="session")
def video_r1_mix(tmp_path_factory) -> Path:
    """Real-shaped Video-R1 data: mixed video sizes and rates, images, every problem type, one truncated mp4."""
    from common.videor1mix import write_video_r1_mix

    return write_video_r1_mix(tmp_path_factory.mktemp("video_r1_mix"), seed=0)


@pytest.fixture(scope="session")
def answering_model_dir(tiny_model_dir, tiny_world_dir, tmp_path_factory) -> Path:
    """The tiny model after a few supervised steps on answer-only targets: it writes
    `<answer>X</answer>`, right about a quarter of the time, so GRPO groups have reward variance
    and a training step really changes the weights (an untrained model scores 0 everywhere)."""
    import subprocess

    out = tmp_path_factory.mktemp("answering_model")
    subprocess.run([sys.executable, "train_sft.py", f"model={tiny_model_dir}", f"data={tiny_world_dir / 'train.json'}",
                    f"output_dir={out}", "frames.num=4", "batch_size=8", "max_steps=30", "lr=3e-3",
                    "with_reasoning=false"], cwd=ROOT, check=True, capture_output=True)
    return out / "final"


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory) -> Path:
    from common.models import TinySpec, build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_qwen3_vl"), TinySpec(arch="qwen3_vl"))


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory) -> Path:
    from common.models import TinySpec, build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_llava_onevision"), TinySpec(arch="llava_onevision"))


TINY_ARCH_FIXTURES = {"qwen2_5_vl": "tiny_model_dir", "qwen3_vl": "tiny_qwen3_vl_dir",
                      "llava_onevision": "tiny_llava_onevision_dir"}
# Families whose cheap train_ktr.py attribution passes run (LLaVA-OneVision: video prompts; its images, tiled
# "anyres" apart from its videos, stop with an error naming visual_layout(model).image_grids).
ATTRIBUTION_ARCH_FIXTURES = {k: TINY_ARCH_FIXTURES[k] for k in ("qwen2_5_vl", "qwen3_vl", "llava_onevision")}


@pytest.fixture(scope="session", params=list(TINY_ARCH_FIXTURES))
def tiny_arch_dir(request) -> Path:
    """The tiny model of every family: a test using it runs once per family."""
    return request.getfixturevalue(TINY_ARCH_FIXTURES[request.param])


@pytest.fixture(scope="session", params=list(ATTRIBUTION_ARCH_FIXTURES))
def tiny_attribution_arch_dir(request) -> Path:
    """The tiny model of every family whose train_ktr.py attribution runs."""
    return request.getfixturevalue(ATTRIBUTION_ARCH_FIXTURES[request.param])
