"""The Video-R1 mix: loadable, mixed in the ways real data is mixed, readable (but for the one truncated
video), and deterministic."""

import json
from pathlib import Path

import pytest

from common import rewards
from common.data import load_samples
from common.frames import read_image
from common.video import VideoError, probe, read_frames
from common.videor1mix import main, write_video_r1_mix


def test_every_record_loads_and_every_type_is_there_for_both_data_types(video_r1_mix: Path):
    raw = json.loads(video_r1_mix.read_text())
    samples = load_samples(video_r1_mix)
    assert len(samples) == len(raw) >= 12
    pairs = {(s.problem_type, s.data_type) for s in samples}
    assert {(t, d) for t in rewards.PROBLEM_TYPES for d in ("video", "image")} <= pairs
    for r, s in zip(raw, samples, strict=True):
        assert not Path(r["path"]).is_absolute() and s.path.is_file()
        assert r["solution"].startswith("<answer>") and r["data_source"]
        # the stored answer scores 1 under its own type's reward
        assert rewards.accuracy_reward(f"<think>x</think>{r['solution']}", r["solution"], r["problem_type"]) == 1.0


def test_media_differ_in_size_rate_and_length_and_decode(video_r1_mix: Path):
    samples = load_samples(video_r1_mix)
    videos = sorted({s.path for s in samples if s.data_type == "video"})
    images = sorted({s.path for s in samples if s.data_type == "image"})
    broken = [p for p in videos if p.name.startswith("truncated")]
    assert len(broken) == 1 and {p.suffix for p in images} == {".png", ".jpg"}
    shapes, rates, lengths = set(), set(), set()
    for path in videos:
        if path in broken:
            with pytest.raises(VideoError):
                read_frames(path, num_frames=4)
            continue
        clip = read_frames(path)  # every frame, so a bad frame anywhere would show
        total, fps = probe(path)
        assert clip.frames.shape[0] == total == clip.total_frames
        shapes.add(clip.frames.shape[1:3])
        rates.add(fps)
        lengths.add(round(total / fps, 2))
    assert len(shapes) == len(rates) == len(lengths) == len(videos) - 1 >= 4
    assert any(h > w for h, w in shapes)  # a portrait video
    image_shapes = {read_image(p).shape for p in images}
    assert len(image_shapes) == len(images) and all(s[2] == 3 for s in image_shapes)
    assert sum(p.stat().st_size for p in [*videos, *images]) < 1_000_000


def test_same_seed_same_bytes_other_seed_other_data(video_r1_mix: Path, tmp_path: Path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    again = write_video_r1_mix(tmp_path / "again", seed=0)
    assert files(again.parent) == files(video_r1_mix.parent)
    main(["--out", str(tmp_path / "other"), "--seed", "1"])
    other = files(tmp_path / "other")
    assert other.keys() == files(again.parent).keys() and other["train.json"] != files(again.parent)["train.json"]
