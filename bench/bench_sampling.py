"""GRPO rollouts: `generate(num_return_sequences=G)` vs `common.sampling.sample_completions`, side by side.

    python bench/bench_sampling.py [--prompts 16 --generations 8 --frames 8 16 32 --tokens 48 --threads 2]

generate copies each prompt G times before it starts, so the vision tower encodes each video G times and
each prompt is prefilled G times; ours encodes and prefills each prompt once and repeats its KV cache.
Both sample from the same RNG state with the same decoding (temperature 1, top-p 0.95, the visual
placeholders banned) and must return the same tokens. The model is the tiny Qwen2.5-VL (random weights),
so completions run to --tokens; the prompt grows with --frames (16 visual tokens per 2 frames at 112 px).
Each size: one warm-up call of each, then --repeats alternating calls; prints the median seconds and
their ratio, and whether the tokens were equal in every call.
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

from common.models import build_tiny, generate_exact, load_model, load_processor, model_inputs, visual_tokens  # noqa: E402
from common.sampling import sample_completions  # noqa: E402
from common.video import Clip  # noqa: E402


def with_generate(model, inputs, banned, args, seed):
    torch.manual_seed(seed)
    out = generate_exact(model, inputs, max_new_tokens=args.tokens, do_sample=True, top_p=0.95,
                         num_return_sequences=args.generations, bad_words_ids=[[t] for t in banned])
    model.model.rope_deltas = None
    return out[:, inputs["input_ids"].shape[1]:]


def with_ours(model, inputs, banned, args, seed):
    ids = model.generation_config  # the special tokens generate uses
    torch.manual_seed(seed)
    return sample_completions(model, inputs, args.generations, max_new_tokens=args.tokens,
                              eos_ids=[ids.eos_token_id], pad_token_id=ids.pad_token_id,
                              top_p=0.95, banned_ids=banned)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model")
        model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    banned = visual_tokens(model.config).placeholders
    rng = np.random.default_rng(0)
    print(f"{args.prompts} prompts x G = {args.generations}, {args.tokens} new tokens, tiny Qwen2.5-VL, "
          f"{args.threads} threads")
    print(f"{'frames':>6}{'prompt tokens':>15}{'generate s':>12}{'ours s':>10}{'ratio':>8}  same tokens")
    for n_frames in args.frames:
        clips = [Clip(rng.integers(0, 255, (n_frames, 112, 112, 3), dtype=np.uint8), list(range(n_frames)),
                      [i / 2 for i in range(n_frames)], 2.0, n_frames) for _ in range(args.prompts)]
        inputs = model_inputs(processor, [f"Question {i}: what happens, and in which order?" * (1 + i % 3)
                                          for i in range(args.prompts)], clips)

        times = {"hf": [], "ours": []}
        same = True
        with torch.no_grad():
            for fn in (with_generate, with_ours):  # warm-up
                fn(model, inputs, banned, args, 0)
            for seed in range(args.repeats):
                for name, fn in (("hf", with_generate), ("ours", with_ours)):
                    start = time.perf_counter()
                    out = fn(model, inputs, banned, args, seed)
                    times[name].append(time.perf_counter() - start)
                    if name == "hf":
                        expected = out
                same &= torch.equal(out, expected)
        a, b = statistics.median(times["hf"]), statistics.median(times["ours"])
        print(f"{n_frames:>6}{inputs['input_ids'].shape[1]:>15}{a:>12.2f}{b:>10.2f}{a / b:>7.1f}x  {same}")


if __name__ == "__main__":
    main()
