"""Time Frame-Voyager labeling: the straightforward way against label_frames.CombinationLabeler.

Same samples, same combinations (M candidates, K sampled T-frame combinations per sample):

- straightforward: for each combination, read its T frames, run the processor, run a full forward
  (vision tower + LLM + LM head over the whole sequence), take the answer loss;
- straightforward, decode shared: the same, with the M candidates decoded once per sample (isolates
  what the processor/forward sharing buys);
- ours: decode + preprocess once, encode each distinct temporal patch once, one token sequence and
  RoPE index per sample, batched LLM forwards, LM head on the answer positions only.

Prints combinations/s for each, the throughput ratios, and the largest loss difference (must be
<= 1e-4). What no exact method can skip is one LLM forward per combination; on a CPU, where that
forward is compute-bound, the ratio therefore shrinks as the LLM grows (measured: 4.6-5.7x for the
0.8M tiny model, 2.3x for a 4.6M one). The batching part of the win is larger on GPUs, where one
combination per forward leaves the device mostly idle (not measured here).

Usage: python bench/bench_label.py [--model DIR] [--data FILE] [--samples 4] [--candidates 16]
       [--num-frames 4] [--combinations 128] [--batch-size 16] [--threads 1]
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
from common.data import build_prompt, load_samples  # noqa: E402
from common.models import load_model, load_processor, model_inputs  # noqa: E402
from common.video import read_frames  # noqa: E402
from label_frames import (  # noqa: E402
    CombinationLabeler,
    answer_losses,
    balanced_combinations,
    straightforward_losses,
    target_length,
    target_text,
)


@torch.no_grad()
def naive_losses(model, processor, sample, candidates, prompt, target, combos) -> list[float]:
    """What one writes first: read the combination's frames, process, forward, per combination."""
    n = target_length(processor, prompt, target)
    out = []
    for combo in combos:
        clip = read_frames(sample.path, indices=[candidates[p] for p in combo])
        inputs = model_inputs(processor, [prompt], [clip], targets=[target]).to(model.device)
        logits = model(**inputs).logits
        out.append(answer_losses(logits[:, -n - 1:-1], inputs["input_ids"][:, -n:]).item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_model = ROOT / "outputs/tiny/sft/final"
    ap.add_argument("--model", default=str(default_model if default_model.exists() else ROOT / "outputs/tiny/model"))
    ap.add_argument("--data", default=str(ROOT / "outputs/tiny/data/train.json"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--num-frames", type=int, default=4)
    ap.add_argument("--combinations", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--target", default="reasoning_answer", choices=["answer", "reasoning_answer"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model = load_model(a.model).eval()
    processor = load_processor(a.model)
    samples = [s for s in load_samples(a.data) if s.data_type == "video"][: a.samples]
    times = {"straightforward": 0.0, "straightforward, decode shared": 0.0, "ours": 0.0}
    worst, n_combos = 0.0, 0
    for k, sample in enumerate(samples):
        prompt, target = build_prompt(sample), target_text(sample, a.target)
        combos = balanced_combinations(a.candidates, a.num_frames, a.combinations, random.Random(k))
        n_combos += len(combos)

        t0 = time.perf_counter()
        clip = read_frames(sample.path, num_frames=a.candidates)
        fast = CombinationLabeler(model, processor, clip, prompt, target, a.num_frames).losses(combos, a.batch_size)
        t1 = time.perf_counter()
        shared = straightforward_losses(model, processor, read_frames(sample.path, num_frames=a.candidates),
                                        prompt, target, combos)
        t2 = time.perf_counter()
        naive = naive_losses(model, processor, sample, clip.indices, prompt, target, combos)
        t3 = time.perf_counter()
        times["ours"] += t1 - t0
        times["straightforward, decode shared"] += t2 - t1
        times["straightforward"] += t3 - t2
        worst = max([worst, *(abs(x - y) for x, y in zip(fast, shared, strict=True)),
                     *(abs(x - y) for x, y in zip(fast, naive, strict=True))])

    print(f"model {a.model}: {len(samples)} samples x {a.combinations} combinations "
          f"(M={a.candidates}, T={a.num_frames}, target={a.target}, batch {a.batch_size}, {a.threads} thread(s))")
    for name, seconds in times.items():
        print(f"  {name:<32}{n_combos / seconds:>9.1f} combinations/s  ({seconds:.2f} s)")
    for name in ("straightforward", "straightforward, decode shared"):
        print(f"  throughput ratio ours / {name}: {times[name] / times['ours']:.1f}x")
    print(f"  max |loss difference|: {worst:.2e} ({'ok' if worst <= 1e-4 else 'FAIL'}: must be <= 1e-4)")
    if worst > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
