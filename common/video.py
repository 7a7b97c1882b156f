"""Frame-exact, selective video reading with PyAV.

Video-LLMs look at a handful of frames of long videos, so decoding and converting every frame wastes
most of the time, while naive seeking silently returns wrong frames (B-frames, streams whose first pts
is not 0, edit lists, containers that lie about their length). Here a plain sequential decode is the
definition of "frame i"; seeking is only an optimisation, and any surprise on the seek path (a pts that
does not land on the expected frame number, a seek that overshoots, the stream ending early) falls
back to the sequential decode, which is also the only place that reports truncation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import av
import numpy as np


class VideoError(Exception):
    """A video that cannot be read as asked; the message names the path and the cause."""


@dataclass
class Clip:
    frames: np.ndarray  # uint8, T x H x W x 3 (RGB)
    indices: list[int]  # frame numbers in the video (0-based, presentation order)
    timestamps: list[float]  # seconds since the first frame (from pts; index / fps where pts are missing)
    fps: float  # the video's average frame rate
    total_frames: int  # frames in the video (counted by decoding when the container can't be trusted)


class _SeekFailed(Exception):
    """The seek path met something it cannot map safely; decode sequentially instead."""


@contextmanager
def _open(path: str | os.PathLike) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open `path`'s first video stream, turning every failure into a VideoError naming the path."""
    if not os.path.exists(path):
        raise VideoError(f"{path}: missing file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: cannot open ({e})") from e
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):  # ffmpeg opens a PNG/JPEG as a 1-frame "video"
            raise VideoError(f"{path}: not a video (image format {fmt})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decode failed ({e})") from e
    finally:
        container.close()


class _Info(NamedTuple):
    total: int  # frames a sequential decode yields
    fps: float  # average frame rate
    gop: float  # mean keyframe distance, in frames
    cfr: bool  # every timestamp sits on the constant-rate grid, so pts -> frame number is exact


@lru_cache(maxsize=4096)
def _scan(path: str, size: int, mtime_ns: int) -> _Info:
    """Facts about the first video stream, cached by (path, size, mtime) as they may cost a full decode.

    The container's frame count is trusted only when its index lists exactly that many samples and
    none is discarded: webm/mkv report 0, and an mp4 edit list (e.g. from `ffmpeg -ss -c copy`) hides
    frames the decoder drops, so nb_frames overcounts. Otherwise a full decode counts them. Seeking
    maps pts to frame numbers, so it is allowed only if every timestamp (mp4: the index's dts; else
    the decoded pts) lies on the grid of the exact rate and that rate matches the average: mkv reports
    an average rate from the first packets only, so a variable-rate mkv looks constant-rate otherwise.
    """
    with _open(path) as (container, stream):
        avg, rate, tb = stream.average_rate or stream.guessed_rate, stream.base_rate, stream.time_base
        if not avg:
            raise VideoError(f"{path}: unknown frame rate")
        entries = stream.index_entries
        if stream.frames > 0 and len(entries) == stream.frames and not any(e.is_discard for e in entries):
            stamps, keys = [e.timestamp for e in entries], sum(e.is_keyframe for e in entries)
        else:
            stamps, keys = [], 0
            for frame in container.decode(stream):
                stamps.append(frame.pts)
                keys += frame.key_frame
        if not stamps:
            raise VideoError(f"{path}: no decodable frames")
        cfr = bool(rate and tb) and abs(rate / avg - 1) < 1e-3 and None not in stamps
        if cfr:
            grid = np.floor((np.array(stamps, np.int64) - stamps[0]) * float(tb * rate) + 0.5)
            cfr = bool(np.array_equal(grid, np.arange(len(stamps))))
        return _Info(len(stamps), float(avg), len(stamps) / max(1, keys), cfr)


def _info(path: str | os.PathLike) -> _Info:
    st = os.stat(path) if os.path.exists(path) else None
    return _scan(str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)


def probe(path: str | os.PathLike) -> tuple[int, float]:
    """(total_frames, fps) of the first video stream; raises VideoError."""
    info = _info(path)
    return info.total, info.fps


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """Centre frame of each of `num_frames` equal segments: (2i + 1) * total // (2 * num), exact integers.

    Always exactly `num_frames` non-decreasing indices; when num_frames > total_frames frames repeat
    (total 3, num 6 -> [0, 0, 1, 1, 2, 2]) so a model that needs a fixed count still gets one.
    """
    if total_frames <= 0 or num_frames <= 0:
        raise ValueError(f"need total_frames > 0 and num_frames > 0, got {total_frames}, {num_frames}")
    return [(2 * i + 1) * total_frames // (2 * num_frames) for i in range(num_frames)]


def fps_indices(total_frames: int, video_fps: float, fps: float, max_frames: int | None = None) -> list[int]:
    """The frame shown at the centre of each 1/fps interval that starts inside the video.

    A last, partial interval samples the centre of the part inside the video (so a clip shorter than
    1/fps still gives its middle frame); `fps` at or above the video's rate gives every frame once
    (never duplicates). Over `max_frames`, falls back to uniform_indices(total_frames, max_frames) so
    the capped sample still spans the whole video.
    """
    if total_frames <= 0 or video_fps <= 0 or fps <= 0:
        raise ValueError(f"need positive total_frames, video_fps, fps; got {total_frames}, {video_fps}, {fps}")
    step = video_fps / fps  # video frames per sample
    n = max(1, math.ceil(total_frames / step - 1e-9))
    out = sorted({int((k * step + min((k + 1) * step, total_frames)) / 2) for k in range(n)})
    if max_frames is not None and len(out) > max_frames:
        return uniform_indices(total_frames, max_frames)
    return out


def qwen_frame_count(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    """How many frames qwen-vl-utils (Video-R1's reader) samples at `fps`: the video's duration * fps,
    clamped to [min_frames rounded up to even, max_frames rounded down to even] and to the frame count,
    then rounded down to even, the temporal patch of 2 frames. A 1-frame video gives 1 (the reference
    raises; the processor pads it to a patch)."""
    if total_frames <= 0 or video_fps <= 0 or fps <= 0 or min_frames <= 0 or max_frames < 2:
        raise ValueError(f"need positive total_frames, video_fps, fps, min_frames and max_frames >= 2; got "
                         f"{total_frames}, {video_fps}, {fps}, {min_frames}, {max_frames}")
    lo, hi = 2 * math.ceil(min_frames / 2), 2 * (max_frames // 2)
    n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
    return max(1, 2 * math.floor(n / 2))


def _decode_sequential(container, stream, targets: list[int], path, total: int) -> dict[int, tuple]:
    """Decode from the start, converting only the wanted frames to RGB: the ground truth for numbering."""
    wanted, out, n, start = set(targets), {}, 0, None
    for frame in container.decode(stream):
        start = frame.pts if start is None else start
        if n in wanted:
            t = None if frame.pts is None else float((frame.pts - start) * stream.time_base)
            out[n] = (frame.to_ndarray(format="rgb24"), t)
        n += 1
        if n > targets[-1]:
            return out
    raise VideoError(f"{path}: truncated: requested frame {targets[-1]} but decoded {n} of {total} frames")


def _decode_seek(container, stream, targets: list[int], gop: float) -> dict[int, tuple]:
    """Seek to the keyframe before each far-away target and decode forward; near targets just decode on.

    Frame numbers come from pts relative to the first frame at the stream's exact (r_frame_rate) rate,
    valid for constant-rate streams only (_Info.cfr). A pts that skips the target or goes backwards, or
    an early end, still raises _SeekFailed rather than risk returning a wrong frame.
    """
    tb, rate = stream.time_base, stream.base_rate
    frames = container.decode(stream)
    cur = next(frames, None)
    if cur is None or cur.pts is None:
        raise _SeekFailed
    start = cur.pts
    index = lambda f: round((f.pts - start) * tb * rate)
    cur_i, out = 0, {}
    for t in targets:
        if t - cur_i > gop:
            # mp4 seeks by dts, so with B-frames the keyframe found can lie after the target: go further back
            for back in [0] + [2**k for k in range(t.bit_length())] + [t]:
                midpoint = Fraction(2 * max(0, t - back) + 1, 2) / (rate * tb)  # between target and next pts
                container.seek(start + math.floor(midpoint), stream=stream, backward=True)
                frames = container.decode(stream)
                landed = next(frames, None)
                if landed is None or landed.pts is None:
                    raise _SeekFailed
                if index(landed) <= t:
                    break
            else:
                raise _SeekFailed
            if index(landed) <= cur_i:  # the seek bought nothing: keyframes are further apart than thought
                gop = max(gop, t - index(landed))
            cur, cur_i = landed, index(landed)
        while cur_i < t:
            cur = next(frames, None)
            if cur is None or cur.pts is None or index(cur) <= cur_i:
                raise _SeekFailed
            cur_i = index(cur)
        if cur_i != t:
            raise _SeekFailed
        out[t] = (cur.to_ndarray(format="rgb24"), float((cur.pts - start) * tb))
    return out


def _select(path, total: int, fps_video: float, indices, num_frames, fps, max_frames, min_frames=None) -> list[int]:
    if indices is not None:
        wanted = [int(i) for i in indices]
        if not wanted:
            raise ValueError(f"{path}: indices is empty")
        for k, i in enumerate(wanted):
            if not 0 <= i < total:
                raise ValueError(f"{path}: frame index {i} out of range [0, {total})")
            if k and i <= wanted[k - 1]:
                raise ValueError(f"{path}: indices must be strictly increasing, got {i} after {wanted[k - 1]}")
        return wanted
    if num_frames is not None:
        return uniform_indices(total, num_frames)
    if fps is not None and min_frames is not None:
        return uniform_indices(total, qwen_frame_count(total, fps_video, fps, min_frames, max_frames or max(2, total)))
    if fps is not None:
        return fps_indices(total, fps_video, fps, max_frames)
    if max_frames is not None and max_frames < total:
        return uniform_indices(total, max_frames)
    return list(range(total))


def read_frames(path: str | os.PathLike, indices: Sequence[int] | None = None, num_frames: int | None = None,
                fps: float | None = None, max_frames: int | None = None, min_frames: int | None = None, *,
                _method: str = "auto") -> Clip:
    """Read selected frames of `path`'s first video stream, byte-identical to a full sequential decode.

    Select with at most one of `indices` (strictly increasing and in range, else ValueError naming the
    index: silently reordering would misalign whatever the caller pairs with them), `num_frames`
    (uniform_indices) or `fps` (fps_indices, capped by `max_frames`; with `min_frames`, the qwen-vl-utils
    count instead, see qwen_frame_count, spread by uniform_indices); with none, all frames, capped
    uniformly by `max_frames`. Raises VideoError for unreadable or truncated videos and never returns
    fewer frames than selected. `_method` ("auto", "sequential", "seek") is for tests and benchmarks.
    """
    if sum(x is not None for x in (indices, num_frames, fps)) > 1:
        raise ValueError("give at most one of indices, num_frames, fps")
    if max_frames is not None and (indices is not None or num_frames is not None):
        raise ValueError("max_frames only applies to fps= or all-frames reads")
    if min_frames is not None and fps is None:
        raise ValueError("min_frames only applies to fps= reads")
    for name, value in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames),
                        ("min_frames", min_frames)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if _method not in ("auto", "sequential", "seek"):
        raise ValueError(f"unknown _method {_method!r}")
    total, fps_video, gop, cfr = _info(path)
    wanted = _select(path, total, fps_video, indices, num_frames, fps, max_frames, min_frames)
    targets = sorted(set(wanted))
    method = _method if cfr else "sequential"
    if method == "auto":  # seeking pays off only when targets lie further apart than keyframes
        method = "seek" if (targets[-1] + 1) / len(targets) > gop else "sequential"
    decoded = None
    if method == "seek":
        with _open(path) as (container, stream):
            try:  # a forced seek seeks for every target, to exercise the path
                decoded = _decode_seek(container, stream, targets, gop if _method == "auto" else 0)
            except (_SeekFailed, av.error.FFmpegError):
                decoded = None
    if decoded is None:  # a fresh container: a failed seek must not shift frame numbering
        with _open(path) as (container, stream):
            decoded = _decode_sequential(container, stream, targets, path, total)
    return Clip(frames=np.stack([decoded[i][0] for i in wanted]), indices=wanted,
                timestamps=[i / fps_video if decoded[i][1] is None else decoded[i][1] for i in wanted],
                fps=fps_video, total_frames=total)
