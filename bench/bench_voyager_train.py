"""Time a Frame-Voyager training step: one forward and ranking loss per sample against one padded batch.

train_voyager.py's features are cached, so an epoch costs only the two small heads and the pairwise loss.
Done one sample at a time (`per_sample_loss`, the straightforward way) a step of 32 samples is a few
hundred tiny autograd ops, and Python overhead is the time. `batch_loss` pads the batch and runs it as
one forward and one loss. Same samples, same combination draws, same heads: prints steps/s for each,
the ratio, and the largest difference in loss and gradient (float rounding only).

By default the samples have the tiny default's shapes (M = 16 candidates of 4 visual tokens, about 60 query
tokens, 64 labeled combinations of 8 frames, hidden 128); --tokens / --hidden give a larger backbone's.

Usage: python bench/bench_voyager_train.py [--steps 50] [--batch-size 32] [--candidates 16] [--tokens 4]
       [--hidden 128] [--dim 128] [--combinations 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.voyager import VoyagerHeads  # noqa: E402
from train_voyager import Item, batch_loss, per_sample_loss  # noqa: E402


def make_items(n: int, m: int, p: int, hidden: int, k: int, t: int, seed: int = 0) -> list[Item]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        lq = int(torch.randint(40, 80, (1,), generator=g))
        combos = torch.stack([torch.randperm(m, generator=g)[:t].sort().values for _ in range(k)])
        items.append(Item(torch.randn(m, p, hidden, generator=g), torch.randn(lq, hidden, generator=g), combos,
                          torch.rand(k, generator=g), list(range(m)), 64, None))
    return items


def run(fn, heads, items, steps, batch_size, combos) -> tuple[float, list[torch.Tensor], float]:
    """Seconds for `steps` forward+backward passes; the first step's loss and gradients."""
    rng, first = random.Random(0), None
    start = time.perf_counter()
    for s in range(steps):
        batch = [items[(s * batch_size + i) % len(items)] for i in range(batch_size)]
        heads.zero_grad()
        loss = fn(heads, batch, rng, combos, 0.0, torch.device("cpu"))
        loss.backward()
        if first is None:
            first = (loss.item(), [q.grad.clone() for q in heads.parameters()])
    return time.perf_counter() - start, first[1], first[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4, help="visual tokens per frame")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--combinations", type=int, default=64)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = make_items(4 * args.batch_size, args.candidates, args.tokens, args.hidden, args.combinations,
                       args.num_frames)
    heads = VoyagerHeads(args.hidden, args.dim)
    run(batch_loss, heads, items, 2, args.batch_size, args.combinations)  # warm-up
    t_naive, g_naive, l_naive = run(per_sample_loss, heads, items, args.steps, args.batch_size, args.combinations)
    t_ours, g_ours, l_ours = run(batch_loss, heads, items, args.steps, args.batch_size, args.combinations)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(g_naive, g_ours, strict=True))
    print(f"{args.steps} steps of {args.batch_size} samples (M={args.candidates}, {args.tokens} tokens per frame, "
          f"hidden {args.hidden}, {args.combinations} combinations of {args.num_frames}), {args.threads} thread(s)")
    print(f"  one sample at a time: {args.steps / t_naive:7.1f} steps/s")
    print(f"  one padded batch:     {args.steps / t_ours:7.1f} steps/s")
    print(f"  ratio {t_naive / t_ours:.1f}x; loss differs by {abs(l_naive - l_ours):.1e}, gradients by {grad_diff:.1e}")


if __name__ == "__main__":
    main()
