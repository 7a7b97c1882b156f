"""Time a multi-epoch SFT's frame reading with and without `frames.cache_mb` (common.frames.ClipCache).

Writes N tinyworld videos (64 frames, 112 x 112, as the tiny default) to a temp dir, then reads 8 uniform
frames of every video for E epochs in shuffled batches of 16, as train_sft.py does: plain (decode every
time) against cached (decode once, then memory). Checks that both give the same frames, and prints the
seconds, the ratio and the cache's size. The tiny default's SFT reads 2,000 videos for 6 epochs.
Usage: python bench/bench_clip_cache.py [--videos 200] [--epochs 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import tinyworld  # noqa: E402
from common.data import epoch_batches, load_samples  # noqa: E402
from common.frames import FramesConfig, load_batch, make_selector  # noqa: E402


def read_epochs(samples, select, epochs: int) -> tuple[float, list[np.ndarray]]:
    t0, last = time.perf_counter(), []
    for epoch in range(epochs):
        for batch in epoch_batches(len(samples), 16, 1, 0, 0, epoch):
            _, clips = load_batch([samples[i] for i in batch], select, "stop", None)
            if epoch == epochs - 1:
                last += [c.frames for c in clips]
    return time.perf_counter() - t0, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tinyworld.generate(tmp, args.videos, 0, seed=0, workers=1, progress=False)
        samples = load_samples(Path(tmp) / "train.json")
        plain_s, plain = read_epochs(samples, make_selector(FramesConfig(num=8)), args.epochs)
        cached = make_selector(FramesConfig(num=8, cache_mb=1024))
        cached_s, from_cache = read_epochs(samples, cached, args.epochs)
    assert all(np.array_equal(a, b) for a, b in zip(plain, from_cache, strict=True)), "the cache changed the frames"
    print(f"{args.videos} videos x {args.epochs} epochs, 8 frames each: plain {plain_s:.2f} s, "
          f"cached {cached_s:.2f} s -> {plain_s / cached_s:.1f}x; cache {cached.bytes / 2**20:.0f} MiB "
          f"({cached.misses} decodes, {cached.hits} hits); same frames: yes")


if __name__ == "__main__":
    main()
