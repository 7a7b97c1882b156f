"""Video-R1's frame recipe: fps sampling with a minimum and maximum count (even, as qwen-vl-utils
rounds it), and the config keys that carry it."""

from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load_config
from common.data import Sample
from common.frames import FramesConfig, make_selector
from common.tinyworld import encode
from common.video import fps_indices, qwen_frame_count, read_frames, uniform_indices


def write_video(path: Path, frames: int, fps: int) -> Path:
    video = np.zeros((frames, 32, 32, 3), np.uint8)
    video[:, :, :, 0] = np.arange(frames, dtype=np.uint8)[:, None, None] * 3  # each frame distinct
    encode(path, video, fps)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fps_videos")
    return {"short": write_video(d / "short.mp4", 10, 8),  # 1.25 s: 2.5 frames at 2 fps
            "tiny": write_video(d / "tiny.mp4", 3, 8),  # fewer frames than min_frames
            "mid": write_video(d / "mid.mp4", 60, 8),  # 7.5 s: 15 frames at 2 fps
            "long": write_video(d / "long.mp4", 200, 8)}  # 25 s: 50 frames at 2 fps


@pytest.mark.parametrize("total, fps_video, lo, hi, expected", [
    (10, 8, 4, 16, 4),  # short: raised to min_frames
    (60, 8, 4, 16, 14),  # 15 -> rounded down to even
    (56, 8, 4, 16, 14),  # exactly 14
    (200, 8, 4, 16, 16),  # long: capped at max_frames
    (200, 8, 3, 15, 14),  # odd bounds: min rounds up to 4, max down to 14
    (10, 8, 3, 16, 4),
    (3, 8, 4, 16, 2),  # never more than the video has, still even
    (1, 8, 4, 16, 1),  # a single frame stays one frame (the processor pads the patch)
    (7200, 30, 4, 64, 64),  # 4 minutes at 30 fps, eval-size cap
])
def test_qwen_frame_count_matches_qwen_vl_utils_rounding(total, fps_video, lo, hi, expected):
    assert qwen_frame_count(total, fps_video, 2.0, lo, hi) == expected


def test_min_frames_reads_even_counts_spread_over_short_and_long_videos(videos):
    counts = {}
    for name, path in videos.items():
        clip = read_frames(path, fps=2.0, min_frames=4, max_frames=16)
        total = clip.total_frames
        assert clip.indices == uniform_indices(total, len(clip.indices))
        assert len(set(clip.indices)) == len(clip.indices)  # distinct frames, never repeats
        counts[name] = len(clip.indices)
    assert counts == {"short": 4, "tiny": 2, "mid": 14, "long": 16}
    assert all(n % 2 == 0 for n in counts.values())
    # The long video's 16 frames span it from start to end.
    long = read_frames(videos["long"], fps=2.0, min_frames=4, max_frames=16)
    assert long.indices[0] < 200 / 16 and long.indices[-1] > 200 - 200 / 16


def test_default_fps_strategy_is_unchanged(videos):
    sample = Sample(problem_id="x", problem="q", data_type="video", problem_type="multiple choice", options=[],
                    solution="", path=videos["mid"])
    cfg = FramesConfig(strategy="fps", fps=2.0, max_frames=64)
    assert cfg.min_frames == 0 and cfg.max_pixels == 0 and cfg.image_max_pixels == 0
    clip = make_selector(cfg)(sample)
    assert clip.indices == fps_indices(60, 8.0, 2.0, 64) and len(clip.indices) == 15  # odd count kept, as before
    recipe = make_selector(FramesConfig(strategy="fps", fps=2.0, min_frames=4, max_frames=16))(sample)
    assert len(recipe.indices) == 14


def test_min_frames_needs_fps_and_positive_values(videos):
    with pytest.raises(ValueError, match="min_frames only applies to fps"):
        read_frames(videos["mid"], num_frames=4, min_frames=4)
    with pytest.raises(ValueError, match="min_frames must be > 0"):
        read_frames(videos["mid"], fps=2.0, min_frames=0)


@pytest.mark.parametrize("values, message", [
    (dict(min_frames=-1), r"frames\.min_frames: must be >= 0"),
    (dict(min_frames=20), r"frames\.min_frames: 20 must be <= frames\.max_frames=16"),
    (dict(min_frames=1, max_frames=1), r"frames\.min_frames: 1 must be <= |frames\.max_frames: must be >= 2"),
    (dict(max_pixels=100), r"frames\.max_pixels: must be 0 \(processor default\) or >= 784"),
    (dict(image_max_pixels=-5), r"frames\.image_max_pixels: must be 0"),
])
def test_bad_frame_values_name_the_key(values, message):
    cfg = FramesConfig(strategy="fps", max_frames=16)
    for key, value in values.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_paper_configs_carry_the_reference_frame_recipe():
    import eval as eval_stage
    import train_ktr
    import train_sft

    root = Path(__file__).resolve().parents[1] / "configs"
    train = dict(strategy="fps", fps=2.0, min_frames=4, max_frames=16, max_pixels=128 * 28 * 28,
                 image_max_pixels=256 * 28 * 28)
    for module, name in ((train_ktr, "ktr"), (train_ktr, "grpo"), (train_sft, "sft")):
        frames = load_config(module.Config, root / f"{name}.yaml", validate=False).frames
        assert {k: getattr(frames, k) for k in train} == train, name
    cfg = load_config(eval_stage.Config, root / "eval.yaml", validate=False)
    assert {k: getattr(cfg.frames, k) for k in train} == {**train, "max_frames": 32}
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (0.1, 0.001, 0, 1024)
    tiny = load_config(eval_stage.Config, root / "tiny" / "eval.yaml", validate=False)
    assert tiny.temperature == 0 and tiny.frames.max_pixels == 0  # the tiny default stays greedy, saved resolution
