"""GRPO's loss passes over a rollout: the full forward over all B*G rows vs each prompt once (`prefix_sharing`).

    python bench/bench_prefix_sharing.py [--prompts 16 --generations 8 --frames 8 32 --tokens 40 --threads 1]
                                         [--checkpointing]

train_ktr.py computes the policy's completion log-probs with gradients (forward + backward) and, with
beta > 0, the reference model's without. The full forward runs every one of the B*G rows over its whole
prompt; `prefix_shared_logps` runs the B prompts once and repeats their KV cache G times (the backward
adds the G completions' gradients up in the prompt). Both must give the same log-probs and gradients up to
float rounding. The model is the tiny Qwen2.5-VL (random weights); the prompt grows with --frames (16
visual tokens per 2 frames at 112 px). Each size: a warm-up, then --repeats alternating calls; prints
the median seconds, their ratio, and the largest differences of the log-probs and of the gradients.
--checkpointing runs both with gradient checkpointing, as the paper configs train (the backward then
replays every layer's forward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.attribution import build_rollout, policy_logps, prefix_shared_logps, visual_features  # noqa: E402
from common.models import build_tiny, load_model, load_processor, model_inputs  # noqa: E402
from common.video import Clip  # noqa: E402


def policy_step(model, rollout, shared: bool):
    """Forward with gradients, then backward of a fixed weighting of the log-probs; (log-probs, gradients)."""
    model.zero_grad()
    features = visual_features(model, rollout.visual_inputs)
    fn = prefix_shared_logps if shared else policy_logps
    logps, _ = fn(model, rollout, features, chunk_size=64, with_entropy=True)
    (logps * rollout.completion_mask).sum().backward()
    return logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@torch.no_grad()
def reference_pass(model, rollout, shared: bool):
    features = visual_features(model, rollout.visual_inputs)
    fn = prefix_shared_logps if shared else policy_logps
    return fn(model, rollout, features, chunk_size=64, with_entropy=False)[0], None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on, in both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model")
        model, processor = load_model(model_dir), load_processor(model_dir)
    model.get_encoder("video").requires_grad_(False)  # as train_ktr.py's default (freeze_vision)
    if args.checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # layers checkpoint in training mode only (the tiny model has no dropout)
    eos = processor.tokenizer.eos_token_id
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    print(f"{args.prompts} prompts x G = {args.generations}, {args.tokens} completion tokens, tiny Qwen2.5-VL, "
          f"{args.threads} thread(s){', gradient checkpointing' if args.checkpointing else ''}")
    print(f"{'frames':>6}{'prompt':>8}  {'pass':<22}{'full s':>8}{'shared s':>10}{'ratio':>7}"
          f"{'max |dlogp|':>13}{'max |dgrad|':>13}")
    for n_frames in args.frames:
        clips = [Clip(rng.integers(0, 255, (n_frames, 112, 112, 3), dtype=np.uint8), list(range(n_frames)),
                      [i / 2 for i in range(n_frames)], 2.0, n_frames) for _ in range(args.prompts)]
        inputs = model_inputs(processor, [f"Question {i}: what happens, and in which order?" * (1 + i % 3)
                                          for i in range(args.prompts)], clips)
        n = args.prompts * args.generations
        completions = torch.randint(10, 200, (n, args.tokens), generator=gen)
        completions[torch.arange(n), torch.randint(args.tokens // 2, args.tokens, (n,), generator=gen)] = eos
        rollout = build_rollout(model, inputs, completions, args.generations, [eos])
        for label, fn in (("policy forward+backward", policy_step), ("reference (no grad)", reference_pass)):
            times = {False: [], True: []}
            out = {shared: fn(model, rollout, shared) for shared in (False, True)}  # warm-up, and the check
            for _ in range(args.repeats):
                for shared in (False, True):
                    start = time.perf_counter()
                    fn(model, rollout, shared)
                    times[shared].append(time.perf_counter() - start)
            mask = rollout.completion_mask
            dlogp = (out[False][0] - out[True][0]).abs()[mask].max().item()
            dgrad = "" if out[False][1] is None else f"{(out[False][1] - out[True][1]).abs().max().item():.1e}"
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"{n_frames:>6}{inputs['input_ids'].shape[1]:>8}  {label:<22}{a:>8.2f}{b:>10.2f}{a / b:>6.1f}x"
                  f"{dlogp:>13.1e}{dgrad:>13}")


if __name__ == "__main__":
    main()
