"""common.video: frame-exact selective decoding, checked against a plain full PyAV decode."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from common import video
from common.video import Clip, VideoError, fps_indices, probe, read_frames, uniform_indices

N = 72  # frames per test video
W, H = 64, 48


def frame_image(i: int) -> np.ndarray:
    """Distinct after lossy coding: background level, a moving block and the index in binary."""
    img = np.full((H, W, 3), (i * 9) % 200, np.uint8)
    x = (i * 5) % (W - 12)
    img[4:20, x:x + 12] = (255, 40, 40)
    for bit in range(7):
        if i >> bit & 1:
            img[36:46, 2 + bit * 9:9 + bit * 9] = (40, 255, 40)
    return img


def encode(path: Path, codec: str, *, gop: int, bframes: int = 0, opts: dict | None = None,
           fmt: str | None = None, pts: list[int] | None = None, container_opts: dict | None = None) -> Path:
    with av.open(str(path), "w", format=fmt, options=container_opts or {}) as out:
        stream = out.add_stream(codec, rate=25, options=opts or {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        for i in range(N):
            frame = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def drop_leading_frames(src: Path, dst: Path, k: int) -> Path:
    """Remux with timestamps shifted k frames negative: the mp4 muxer writes an edit list, and the
    demuxer then discards k frames that nb_frames still counts (what `ffmpeg -ss -c copy` cuts produce)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        shift = round(k / (s_in.average_rate * s_in.time_base))
        for packet in inp.demux(s_in):
            if packet.dts is None:
                continue
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, s_out
            out.mux(packet)
    return dst


def x264(keyint: int, bframes: int) -> dict:
    return {"x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}"}


VFR_PTS = [i if i < N // 2 else 2 * i - N // 2 for i in range(N)]  # frame rate halves mid-video

MAKERS = {
    "h264_long_gop": lambda d: encode(d / "long.mp4", "libx264", gop=250, opts=x264(250, 3)),
    "h264_short_gop": lambda d: encode(d / "short.mp4", "libx264", gop=4, opts=x264(4, 0)),
    "h264_bframes": lambda d: encode(d / "bframes.mp4", "libx264", gop=8, opts=x264(8, 3)),
    "mpeg4_bframes": lambda d: encode(d / "mpeg4.mp4", "mpeg4", gop=12, bframes=2),
    "vp9_webm": lambda d: encode(d / "vp9.webm", "libvpx-vp9", gop=8),
    "h264_mkv_start_pts_37": lambda d: encode(d / "offset.mkv", "libx264", gop=10, opts=x264(10, 2),
                                              pts=[37 + i for i in range(N)]),
    "h264_mp4_edit_list": lambda d: drop_leading_frames(video_path(d, "h264_short_gop"), d / "edit.mp4", 3),
    "h264_mkv_vfr": lambda d: encode(d / "vfr.mkv", "libx264", gop=10, opts=x264(10, 0), pts=VFR_PTS),
}
CODECS = list(MAKERS)
_cache: dict[str, Path] = {}
_refs: dict[str, list[np.ndarray]] = {}


def video_path(d: Path, name: str) -> Path:
    if name not in _cache:
        _cache[name] = MAKERS[name](d)
    return _cache[name]


@pytest.fixture(scope="module")
def vdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


def reference(path: Path) -> list[np.ndarray]:
    """Ground truth: every frame of a plain sequential PyAV decode."""
    if str(path) not in _refs:
        with av.open(str(path)) as c:
            _refs[str(path)] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return _refs[str(path)]


def assert_frames_exact(clip: Clip, ref: list[np.ndarray]) -> None:
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (len(clip.indices), H, W, 3)
    for frame, i in zip(clip.frames, clip.indices, strict=True):
        assert np.array_equal(frame, ref[i]), f"frame {i} differs from the sequential decode"


def forbid_fallback(monkeypatch) -> None:
    """Make a seek test fail if the seek path gave up and the sequential decode rescued it."""
    def boom(*args, **kwargs):
        raise AssertionError("seek path fell back to sequential decoding")
    monkeypatch.setattr(video, "_decode_sequential", boom)


def test_test_videos_are_what_they_claim(vdir):
    """Guards the other tests: distinct frames, the GOP structures intended, webm reporting 0 frames."""
    for name in CODECS:
        ref = reference(video_path(vdir, name))
        assert len({f.tobytes() for f in ref}) == len(ref), f"{name}: frames not all distinct"
    with av.open(str(video_path(vdir, "h264_long_gop"))) as c:
        assert [i for i, f in enumerate(c.decode(video=0)) if f.key_frame] == [0]
    with av.open(str(video_path(vdir, "h264_short_gop"))) as c:
        assert [i for i, f in enumerate(c.decode(video=0)) if f.key_frame] == list(range(0, N, 4))
    with av.open(str(video_path(vdir, "vp9_webm"))) as c:
        assert c.streams.video[0].frames == 0
    with av.open(str(video_path(vdir, "h264_mkv_start_pts_37"))) as c:
        assert next(c.decode(video=0)).pts > 0


SELECTIONS = {
    "indices": dict(indices=[0, 1, 9, 30, 31, 50, N - 1]),
    "num_frames": dict(num_frames=8),
    "fps": dict(fps=3.0),
    "all_capped": dict(max_frames=6),
}


@pytest.mark.parametrize("method", ["sequential", "seek", "auto"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("codec", CODECS)
def test_frames_equal_full_sequential_decode(vdir, codec, selection, method):
    path = video_path(vdir, codec)
    ref = reference(path)
    kwargs = dict(SELECTIONS[selection])
    if selection == "indices":
        kwargs["indices"] = [i for i in kwargs["indices"] if i < len(ref)]
    clip = read_frames(path, **kwargs, _method=method)
    assert len(clip.indices) == len(clip.timestamps) == len(clip.frames) > 0
    assert_frames_exact(clip, ref)
    assert clip.total_frames == len(ref)


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "h264_mkv_vfr"])
def test_seek_path_alone_lands_on_every_frame(vdir, codec, monkeypatch):
    """Every frame read singly by seeking equals the sequential frame, with no sequential rescue."""
    path = video_path(vdir, codec)
    ref = reference(path)
    forbid_fallback(monkeypatch)
    for i in range(len(ref)):
        assert_frames_exact(read_frames(path, indices=[i], _method="seek"), ref)
    assert_frames_exact(read_frames(path, indices=list(range(0, len(ref), 5)), _method="seek"), ref)


def test_variable_frame_rate_never_seeks_but_stays_exact(vdir, monkeypatch):
    path = video_path(vdir, "h264_mkv_vfr")
    assert not video._info(path).cfr  # mkv reports a constant average rate; the pts grid says otherwise
    ref = reference(path)
    calls = []
    monkeypatch.setattr(video, "_decode_seek", lambda *a: calls.append(a) or {})
    assert_frames_exact(read_frames(path, indices=[3, 40, 60, N - 1], _method="seek"), ref)
    assert not calls


def test_auto_picks_seek_for_sparse_targets_and_sequential_for_dense(vdir, monkeypatch):
    path = video_path(vdir, "h264_short_gop")  # GOP 4: 8 of 72 frames are 9 apart
    used = []
    for name in ("_decode_seek", "_decode_sequential"):
        real = getattr(video, name)
        monkeypatch.setattr(video, name, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))
    read_frames(path, num_frames=8)
    read_frames(path, num_frames=N // 2)
    assert used == ["_decode_seek", "_decode_sequential"]


def test_uniform_indices_hand_computed():
    assert uniform_indices(10, 4) == [1, 3, 6, 8]  # centres 1.25, 3.75, 6.25, 8.75
    assert uniform_indices(72, 8) == [4, 13, 22, 31, 40, 49, 58, 67]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # more wanted than exist: frames repeat
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


def test_fps_indices_centres_caps_and_never_duplicates():
    # 100 frames at 25 fps sampled at 2 fps: one frame per 12.5, at 6.25, 18.75, ...
    assert fps_indices(100, 25.0, 2.0) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert fps_indices(100, 25.0, 2.0, max_frames=8) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert fps_indices(100, 25.0, 2.0, max_frames=4) == uniform_indices(100, 4) == [12, 37, 62, 87]
    assert fps_indices(30, 25.0, 1.0) == [12, 27]  # the partial last second: centre of its 5 frames
    assert fps_indices(5, 25.0, 60.0) == [0, 1, 2, 3, 4]  # faster than the video: each frame once
    assert fps_indices(3, 25.0, 0.1) == [1]  # shorter than one interval: its middle frame


def test_read_frames_uses_the_documented_selection(vdir):
    path = video_path(vdir, "h264_bframes")
    assert read_frames(path, num_frames=8).indices == uniform_indices(N, 8)
    assert read_frames(path, fps=2.0).indices == fps_indices(N, 25.0, 2.0)
    assert read_frames(path, fps=25.0, max_frames=10).indices == uniform_indices(N, 10)
    assert read_frames(path).indices == list(range(N))
    assert read_frames(path, max_frames=N + 5).indices == list(range(N))


def test_more_frames_than_the_video_repeat_exactly(vdir):
    path = video_path(vdir, "h264_long_gop")
    clip = read_frames(path, num_frames=2 * N)
    assert len(clip.frames) == 2 * N and clip.indices == uniform_indices(N, 2 * N)
    assert_frames_exact(clip, reference(path))


@pytest.mark.parametrize("codec", ["h264_bframes", "vp9_webm", "h264_mkv_start_pts_37"])
def test_timestamps_are_index_over_fps_from_first_frame(vdir, codec):
    clip = read_frames(video_path(vdir, codec), indices=[0, 5, 33, 70], _method="seek")
    assert clip.fps == pytest.approx(25.0)
    assert clip.timestamps == pytest.approx([i / 25.0 for i in clip.indices], abs=2e-3)


def test_webm_total_frames_counted_by_decoding(vdir):
    path = video_path(vdir, "vp9_webm")
    assert probe(path) == (N, pytest.approx(25.0))
    assert read_frames(path, num_frames=4).total_frames == N


def test_edit_list_mp4_counts_the_frames_that_decode(vdir):
    path = video_path(vdir, "h264_mp4_edit_list")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == N  # the container's claim includes 3 discarded frames
    assert probe(path)[0] == len(reference(path)) == N - 3
    assert_frames_exact(read_frames(path), reference(path))


def make_error_file(d: Path, kind: str) -> Path:
    path = d / f"bad_{kind}"
    if kind == "missing":
        return d / "no_such_video.mp4"
    if kind == "empty":
        path = path.with_suffix(".mp4")
        path.write_bytes(b"")
    elif kind == "text":
        path = path.with_suffix(".mp4")
        path.write_text("this is not a video\n" * 20)
    elif kind == "audio_only":
        path = path.with_suffix(".wav")
        with av.open(str(path), "w") as out:
            stream = out.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            for packet in [*stream.encode(frame), *stream.encode()]:
                out.mux(packet)
    elif kind == "png":
        path = path.with_suffix(".png")
        with av.open(str(path), "w") as out:
            stream = out.add_stream("png")
            stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(0), format="rgb24")):
                out.mux(packet)
    elif kind == "truncated_moov_at_end":  # first 30% of an mp4 whose index (moov) is written last
        data = video_path(d, "h264_bframes").read_bytes()
        path = path.with_suffix(".mp4")
        path.write_bytes(data[: len(data) * 3 // 10])
    return path


@pytest.mark.parametrize("kind, cause", [
    ("missing", "missing file"),
    ("empty", "empty file"),
    ("text", "cannot open"),
    ("audio_only", "no video stream"),
    ("png", "not a video"),
    ("truncated_moov_at_end", "cannot open"),
])
def test_unreadable_files_raise_video_error_naming_path_and_cause(vdir, kind, cause):
    path = make_error_file(vdir, kind)
    for call in (lambda: probe(path), lambda: read_frames(path, num_frames=4)):
        with pytest.raises(VideoError) as err:
            call()
        assert str(path) in str(err.value) and cause in str(err.value)


@pytest.mark.parametrize("method", ["sequential", "seek", "auto"])
def test_truncated_faststart_mp4_raises_instead_of_returning_fewer_frames(vdir, method):
    full = encode(vdir / f"faststart_{method}.mp4", "libx264", gop=8, opts=x264(8, 0),
                  container_opts={"movflags": "faststart"})
    data = full.read_bytes()
    path = vdir / f"faststart_half_{method}.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index survives; half the frame data does not
    assert probe(path)[0] == N
    with pytest.raises(VideoError, match=r"truncated: requested frame \d+ but decoded \d+ of 72") as err:
        read_frames(path, num_frames=8, _method=method)
    assert str(path) in str(err.value)
    with pytest.raises(VideoError, match="truncated"):
        read_frames(path, _method=method)
    clip = read_frames(path, indices=[0, 3], _method=method)  # frames that survived still read exactly
    assert_frames_exact(clip, reference(full))


@pytest.mark.parametrize("kwargs, message", [
    (dict(indices=[1, 2], num_frames=2), "at most one"),
    (dict(num_frames=4, fps=1.0), "at most one"),
    (dict(indices=[3, 2]), "2 after 3"),
    (dict(indices=[2, 2]), "2 after 2"),
    (dict(indices=[0, N]), f"index {N} out of range"),
    (dict(indices=[-1]), "index -1 out of range"),
    (dict(num_frames=0), "num_frames must be > 0"),
    (dict(num_frames=4, max_frames=2), "max_frames only applies"),
])
def test_bad_arguments_raise_value_error_naming_the_problem(vdir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        read_frames(video_path(vdir, "h264_short_gop"), **kwargs)
