"""Attribution cost: the straightforward way vs ours, side by side on the same inputs.

    python bench/bench_ktr.py [--generations 8 --frames 16 --completion 300 --vocab 152064]

Both ways share the policy's forward over the real input (the loss needs it anyway) and are
timed on what attribution adds to it. Straightforward (what the reference code does): the
entropy from the real pass's full logits, then two extra full forwards (visual tokens masked from
attention; frames shuffled), each re-encoding the video and materialising a float32 log-softmax
over the whole (N x L x vocabulary) logits. Ours: entropies taken chunk by chunk inside the real
pass, visual tokens dropped, shuffled cached vision features, the prompt run once per group with
its KV cache reused, chunked log-probs. Ours also runs the real input through the counterfactuals'
computation, so that an unperturbed input scores exactly 0 (train_ktr.py does). Each method runs in
its own process so that peak memory (max RSS above the process's baseline after loading the model and inputs, over the
real pass and the attribution) is measured cleanly.
Prints times, the time ratio, peak-memory ratio, and the max difference of the scores; then the
temporal counterfactual alone, patch shuffle (cached features) vs frame_shuffle (frames permuted, the
video re-encoded once).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.attribution import (  # noqa: E402
    build_rollout,
    counterfactual_logps,
    naive_logps,
    permute_frame_pixels,
    permute_temporal_patches,
    policy_logps,
    visual_features,
)
from common.grpo import entropy_from_logits  # noqa: E402
from common.models import TinySpec, build_tiny, load_model, load_processor, model_inputs  # noqa: E402
from common.video import Clip  # noqa: E402


def make_inputs(model_dir: Path, args):
    torch.manual_seed(0)
    model = load_model(model_dir).eval()
    processor = load_processor(model_dir)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (args.frames, 112, 112, 3), dtype=np.uint8)
    clip = Clip(frames, list(range(0, 4 * args.frames, 4)), [i / 2 for i in range(args.frames)], 8.0, 4 * args.frames)
    inputs = model_inputs(processor, ["What happens in the video, and in which order?"], [clip])
    vocab = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    completions = torch.randint(vocab + 10, len(processor.tokenizer) - 10, (args.generations, args.completion))
    rollout = build_rollout(model, inputs, completions, args.generations, [processor.tokenizer.eos_token_id])
    perms = [torch.randperm(int(rollout.visual_inputs["video_grid_thw"][0, 0]), generator=torch.Generator()
                            .manual_seed(0))]
    return model, rollout, perms


def run_method(method: str, model_dir: Path, args) -> dict:
    torch.set_num_threads(args.threads)
    model, rollout, perms = make_inputs(model_dir, args)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak memory counts the real pass too
    with torch.no_grad():  # the real pass is the loss's forward in both ways: not counted
        features = visual_features(model, rollout.visual_inputs)
        # ours takes the entropies from the loss's forward, chunk by chunk, at no extra pass
        real, entropy = policy_logps(model, rollout, features, chunk_size=args.chunk, with_entropy=method == "ours")
        if method == "naive":
            full = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                         position_ids=rollout.position_ids, **rollout.repeated_visual_inputs()).logits
            model.model.rope_deltas = None
    start = time.perf_counter()
    with torch.no_grad():
        if method == "naive":
            p = rollout.prompt_length
            entropy = entropy_from_logits(full[:, p - 1:-1].float())
            masked = naive_logps(model, rollout, "masked")
            shuffled = naive_logps(model, rollout, "shuffled", perms)
        else:  # the scores' real log-probs by the counterfactuals' computation (exact 0 when unperturbed)
            real = counterfactual_logps(model, rollout, features, drop_visual=False, chunk_size=args.chunk)
            masked = counterfactual_logps(model, rollout, None, drop_visual=True, chunk_size=args.chunk)
            shuffled = counterfactual_logps(model, rollout, permute_temporal_patches(features, perms),
                                            drop_visual=False, chunk_size=args.chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    scores = torch.stack([real - masked, real - shuffled, entropy])
    out = {"seconds": seconds, "peak_mib": peak / 1024, "scores": scores.tolist()}
    if method == "ours":  # the temporal counterfactual alone: whole patches of cached features vs single frames
        with torch.no_grad():
            start = time.perf_counter()
            counterfactual_logps(model, rollout, permute_temporal_patches(features, perms), drop_visual=False,
                                 chunk_size=args.chunk)
            out["patch_shuffle_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            vision = model.config.vision_config
            n_frames = int(rollout.visual_inputs["video_grid_thw"][0, 0]) * vision.temporal_patch_size
            frame_perm = torch.randperm(n_frames, generator=torch.Generator().manual_seed(0))
            pixels = permute_frame_pixels(rollout.visual_inputs["pixel_values_videos"],
                                          rollout.visual_inputs["video_grid_thw"], [frame_perm],
                                          vision.temporal_patch_size, vision.patch_size)
            reencoded = visual_features(model, {**rollout.visual_inputs, "pixel_values_videos": pixels})
            counterfactual_logps(model, rollout, reencoded, drop_visual=False, chunk_size=args.chunk)
            out["frame_shuffle_seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--completion", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=["naive", "ours"])
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.method:  # a child process: run one method, print JSON
        print(json.dumps(run_method(args.method, Path(args.model_dir), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model", TinySpec(model_vocab=args.vocab))
        results = {}
        for method in ("naive", "ours"):
            cmd = [sys.executable, __file__, "--method", method, "--model-dir", str(model_dir)]
            cmd += [f"--{k}={v}" for k, v in vars(args).items() if k not in ("method", "model_dir")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, ours = results["naive"], results["ours"]
    diff = (torch.tensor(naive["scores"]) - torch.tensor(ours["scores"])).abs().max().item()
    print(f"attribution for G={args.generations}, {args.frames} frames, {args.completion} completion tokens, "
          f"vocabulary {args.vocab}")
    print(f"{'':<16}{'seconds':>10}{'peak MiB':>12}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>10.2f}{r['peak_mib']:>12.0f}")
    print(f"time ratio (naive / ours): {naive['seconds'] / ours['seconds']:.1f}x   "
          f"peak-memory ratio: {naive['peak_mib'] / max(ours['peak_mib'], 1):.1f}x   "
          f"max |score difference|: {diff:.2e}")
    print(f"temporal counterfactual alone: patch shuffle {ours['patch_shuffle_seconds']:.2f} s, frame shuffle "
          f"(frames permuted, video re-encoded) {ours['frame_shuffle_seconds']:.2f} s: "
          f"{ours['frame_shuffle_seconds'] / ours['patch_shuffle_seconds']:.2f}x")


if __name__ == "__main__":
    main()
