"""Shared fixtures: one tiny model and one tiny synthetic world per test session."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # xdist workers share the cores: no more threads than cores
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# The slowest files first (longest-first keeps the 2 workers' shares even): `bash run.sh test` hands whole
# files to the workers in collection order (--dist loadfile --no-loadscope-reorder). Serial seconds, 2026-12-01:
# run_sh 400, train_ktr 300, paper 170, eval 140, train_sft 110, voyager 105, trackers 60, label_frames 30.
SLOWEST_FIRST = ("test_run_sh.py", "test_train_ktr.py", "test_paper.py", "test_eval.py", "test_train_sft.py",
                 "test_voyager.py", "test_trackers.py", "test_label_frames.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built by `build(empty_dir) -> path` once per test run: under xdist the
    first worker to ask builds it (under a lock) in the folder the workers share, the others reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # a dependency of huggingface_hub, so of transformers

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's own
    done = shared / f"{name}.path"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            out = shared / name
            shutil.rmtree(out, ignore_errors=True)  # what a worker that failed half-way left
            out.mkdir()
            done.write_text(str(build(out)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from common.models import build_tiny

    return built_once(tmp_path_factory, "tiny_model", build_tiny)


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    from common.tinyworld import generate

    def build(out):
        generate(out, n_train=8, n_test=8, seed=0, frames=32, size=112, fps=8)
        return out

    return built_once(tmp_path_factory, "tinyworld", build)


@pytest.fixture(scope="session")
def video_r1_mix(tmp_path_factory) -> Path:
    """Real-shaped Video-R1 data: mixed video sizes and rates, images, every problem type, one truncated mp4."""
    from common.videor1mix import write_video_r1_mix

    return built_once(tmp_path_factory, "video_r1_mix", lambda out: write_video_r1_mix(out, seed=0))


@pytest.fixture(scope="session")
def answering_model_dir(tiny_model_dir, tiny_world_dir, tmp_path_factory) -> Path:
    """The tiny model after a few supervised steps on answer-only targets: it writes
    `<answer>X</answer>`, right about a quarter of the time, so GRPO groups have reward variance
    and a training step really changes the weights (an untrained model scores 0 everywhere)."""
    import subprocess

    def build(out):
        subprocess.run([sys.executable, "train_sft.py", f"model={tiny_model_dir}",
                        f"data={tiny_world_dir / 'train.json'}", f"output_dir={out}", "frames.num=4", "batch_size=8",
                        "max_steps=30", "lr=3e-3", "with_reasoning=false"], cwd=ROOT, check=True, capture_output=True)
        return out / "final"

    return built_once(tmp_path_factory, "answering_model", build)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory) -> Path:
    from common.models import TinySpec, build_tiny

    return built_once(tmp_path_factory, "tiny_qwen3_vl", lambda out: build_tiny(out, TinySpec(arch="qwen3_vl")))


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory) -> Path:
    from common.models import TinySpec, build_tiny

    return built_once(tmp_path_factory, "tiny_llava_onevision",
                      lambda out: build_tiny(out, TinySpec(arch="llava_onevision")))


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
