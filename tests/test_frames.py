"""Video-R1's frame recipe: fps sampling with a minimum and maximum count (even, as qwen-vl-utils
rounds it), and the config keys that carry it."""

from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load_config
from common.data import Sample
from common.frames import FramesConfig, evidence_indices, make_selector
from common.tinyworld import encode
from common.video import VideoError, fps_indices, qwen_frame_count, read_frames, uniform_indices


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
    (dict(cache_mb=-1), r"frames\.cache_mb: must be >= 0"),
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


def video_sample(path: Path, problem_id: str) -> Sample:
    return Sample(problem_id=problem_id, problem="q", data_type="video", problem_type="multiple choice",
                  solution="<answer>A</answer>", path=path)


def test_random_strategy_draws_sorted_subsets_of_the_candidates_from_seed_epoch_and_id(videos):
    cfg = FramesConfig(strategy="random", num=8, candidates=16, seed=3)
    candidates = uniform_indices(200, 16)
    draws = {}
    for epoch in range(3):
        for pid in ("a", "b", "c"):
            select = make_selector(cfg)  # a fresh selector, as a resumed run has
            select.set_epoch(epoch)
            clip = select(video_sample(videos["long"], pid))
            assert len(clip.indices) == 8 == len(set(clip.indices)) and clip.indices == sorted(clip.indices)
            assert set(clip.indices) <= set(candidates)
            assert clip.timestamps == [i / 8 for i in clip.indices]  # the true times of the frames kept
            np.testing.assert_array_equal(clip.frames, read_frames(videos["long"], indices=clip.indices).frames)
            assert select(video_sample(videos["long"], pid)).indices == clip.indices  # the same draw again
            draws[epoch, pid] = clip.indices
    assert len(set(map(tuple, draws.values()))) == 9  # each (epoch, id) its own subset
    other_seed = make_selector(FramesConfig(strategy="random", num=8, candidates=16, seed=4))
    assert other_seed(video_sample(videos["long"], "a")).indices != draws[0, "a"]
    # a video with no more frames than T gives them all, as uniform does
    assert make_selector(cfg)(video_sample(videos["tiny"], "a")).indices == uniform_indices(3, 8)
    with pytest.raises(ConfigError, match=r"frames\.num: T=17 must be <= frames\.candidates M=16"):
        FramesConfig(strategy="random", num=17, candidates=16).validate()


def test_segment_strategy_draws_one_frame_inside_each_segment_from_seed_epoch_and_id(videos):
    cfg = FramesConfig(strategy="segment", num=8, seed=3)
    bounds = [k * 200 // 8 for k in range(9)]  # segments of 25 frames
    draws, seen = {}, set()
    for epoch in range(3):
        for pid in ("a", "b", "c"):
            select = make_selector(cfg)  # a fresh selector, as a resumed run has
            select.set_epoch(epoch)
            clip = select(video_sample(videos["long"], pid))
            assert len(clip.indices) == 8 and clip.indices == sorted(clip.indices)
            assert all(lo <= i < hi for i, lo, hi in zip(clip.indices, bounds[:-1], bounds[1:], strict=True))
            assert clip.timestamps == [i / 8 for i in clip.indices]  # the true times of the frames kept
            np.testing.assert_array_equal(clip.frames, read_frames(videos["long"], indices=clip.indices).frames)
            assert select(video_sample(videos["long"], pid)).indices == clip.indices  # the same draw again
            draws[epoch, pid] = clip.indices
            seen.update(clip.indices)
    assert len(set(map(tuple, draws.values()))) == 9  # each (epoch, id) its own draw
    assert len(seen) > 8 * 3  # positions move inside their segments, unlike uniform's fixed centres
    other_seed = make_selector(FramesConfig(strategy="segment", num=8, seed=4))
    assert other_seed(video_sample(videos["long"], "a")).indices != draws[0, "a"]
    # every frame of a segment can be drawn, and only those: 10 frames, 2 segments of 5
    from common.frames import segment_indices
    rng = np.random.default_rng(0)
    got = [segment_indices(10, 2, rng) for _ in range(400)]
    assert {g[0] for g in got} == {0, 1, 2, 3, 4} and {g[1] for g in got} == {5, 6, 7, 8, 9}
    # a video with fewer frames than T gives what uniform gives (frames repeat)
    assert make_selector(cfg)(video_sample(videos["tiny"], "a")).indices == uniform_indices(3, 8)


@pytest.mark.parametrize("total, num, evidence, expected", [
    (64, 8, [10, 11, 12], [4, 12, 20, 28, 36, 44, 52, 60]),  # already seen: uniform as it is
    (64, 8, [], [4, 12, 20, 28, 36, 44, 52, 60]),  # nothing annotated
    (64, 8, [70, 80], [4, 12, 20, 28, 36, 44, 52, 60]),  # nothing in range
    (64, 8, [9, 10, 11], [4, 10, 20, 28, 36, 44, 52, 60]),  # 12 is nearest the middle frame 10
    (64, 8, [16], [4, 16, 20, 28, 36, 44, 52, 60]),  # a tie (12 and 20): the earlier frame moves
    (64, 8, [62, 63], [4, 12, 20, 28, 36, 44, 52, 63]),
    (64, 8, [0, 1], [1, 12, 20, 28, 36, 44, 52, 60]),
])
def test_evidence_indices_move_the_nearest_uniform_frame_onto_the_evidence(total, num, evidence, expected):
    assert evidence_indices(total, num, evidence) == expected


def test_evidence_strategy_reads_those_frames_and_falls_back_to_uniform(videos):
    select = make_selector(FramesConfig(strategy="evidence", num=8))
    sample = video_sample(videos["long"], "a")  # 200 frames: uniform 12, 37, 62, ...
    assert select(sample).indices == uniform_indices(200, 8)  # no annotation
    sample.evidence_frames = [40, 41, 42]
    clip = select(sample)
    assert clip.indices == [12, 41, 62, 87, 112, 137, 162, 187] and clip.timestamps == [i / 8 for i in clip.indices]
    np.testing.assert_array_equal(clip.frames, read_frames(videos["long"], indices=clip.indices).frames)
    short = video_sample(videos["tiny"], "b")  # 3 frames for 8: repeated, as uniform reads them
    short.evidence_frames = [1]
    assert select(short).indices == uniform_indices(3, 8)


def test_clip_cache_returns_the_same_frames_reads_each_video_once_and_stays_within_its_bytes(tmp_path, videos):
    import os

    from common.frames import ClipCache

    reads = []
    plain = make_selector(FramesConfig(num=4))

    def counting(sample):
        reads.append(sample.path)
        return plain(sample)

    clip_bytes = plain(video_sample(videos["long"], "x")).frames.nbytes  # 4 x 32 x 32 x 3
    cache = ClipCache(counting, max_bytes=2 * clip_bytes)  # room for two clips
    a, b, c = (video_sample(videos[k], k) for k in ("long", "mid", "short"))
    missed = cache(a)
    missed.frames[:] = 0  # a caller's in-place changes, to a miss's clip or a hit's, do not reach later reads
    for sample in (b, a, b):
        clip = cache(sample)
        np.testing.assert_array_equal(clip.frames, plain(sample).frames)
        assert clip.indices == plain(sample).indices
        clip.frames[:], clip.indices[0] = 0, -1
    np.testing.assert_array_equal(cache(a).frames, plain(a).frames)
    assert len(reads) == 2 and (cache.hits, cache.misses) == (3, 2)
    cache(c)  # a third clip evicts the least recently used one (b), and the bytes stay within the budget
    assert cache.bytes <= 2 * clip_bytes and len(cache.clips) == 2
    cache(b)
    assert reads[-1] == b.path and len(reads) == 4
    # a file rewritten in place is read again
    moved = write_video(tmp_path / "v.mp4", 40, 8)
    d = video_sample(moved, "d")
    assert cache(d).indices == uniform_indices(40, 4)
    write_video(moved, 80, 8)
    os.utime(moved, ns=(os.stat(moved).st_mtime_ns + 10**9,) * 2)
    assert cache(d).indices == uniform_indices(80, 4)
    np.testing.assert_array_equal(cache(d).frames, plain(d).frames)
    # a broken video raises every time it comes up, and is never cached
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    for _ in range(2):
        with pytest.raises(VideoError):
            cache(video_sample(broken, "e"))
    # the config switch: on for the strategies that read the same frames every time, off for the others
    assert isinstance(make_selector(FramesConfig(num=4, cache_mb=64)), ClipCache)
    assert not isinstance(make_selector(FramesConfig(strategy="random", num=4, cache_mb=64)), ClipCache)
    assert not isinstance(make_selector(FramesConfig(num=4)), ClipCache)
