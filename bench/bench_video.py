"""Time selective decoding (common.video.read_frames) against the naive decode-everything approach.

Writes a 300-frame 224x224 H.264 video (GOP 30) to a temp dir, then times, best of a few runs:
naive = decode + convert every frame to RGB, then index; read_frames(num_frames=8 / 64) with the
automatic method and with each path forced. Checks every output equals the naive frames.
Usage: python bench/bench_video.py [--frames 300] [--size 224] [--gop 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.video import read_frames, uniform_indices  # noqa: E402


def write_video(path: Path, frames: int, size: int, gop: int) -> None:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30, options={"x264-params": f"keyint={gop}:min-keyint={gop}"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):  # a scrolling texture: every frame differs, like real footage
            img = np.roll(texture, shift=(i * 3, i * 2), axis=(0, 1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def naive(path: Path, num: int) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in uniform_indices(len(frames), num)])


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--gop", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mp4"
        write_video(path, a.frames, a.size, a.gop)
        print(f"video: {a.frames} frames {a.size}x{a.size} H.264 GOP {a.gop}, {path.stat().st_size / 1e3:.0f} kB")
        print(f"{'num':>4} {'method':<12} {'seconds':>8} {'vs naive':>9}")
        for num in (8, 64):
            t_naive, ref = best_of(lambda num=num: naive(path, num), a.repeat)
            print(f"{num:>4} {'naive':<12} {t_naive:8.4f} {1.0:8.2f}x")
            for method in ("auto", "sequential", "seek"):
                t, clip = best_of(lambda num=num, m=method: read_frames(path, num_frames=num, _method=m), a.repeat)
                assert np.array_equal(clip.frames, ref), f"{method} num_frames={num} differs from naive decode"
                print(f"{num:>4} {method:<12} {t:8.4f} {t_naive / t:8.2f}x")
    print("all outputs equal the naive decode")


if __name__ == "__main__":
    main()
