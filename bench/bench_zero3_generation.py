"""Generation under ZeRO-3: what each decoding step costs in collectives, three ways side by side.

    python bench/bench_zero3_generation.py [--tokens 32 --processes 2]

Starts `--processes` CPU processes with the shipped configs/accelerate/zero3.yaml (gloo), prepares a
tiny model as train_ktr.py does, and generates the same `--tokens` new tokens three ways:
  sharded   the parameters stay sharded: every module call of every decoding step all-gathers its
            weights (transformers turns on synced_gpus so ranks that finish early keep stepping);
  gathered  the whole model gathered once (deepspeed.zero.GatheredParameters), DeepSpeed's hooks left on;
  ours      gathered once and DeepSpeed's hooks removed for the call (train_ktr.gathered_for_generation).
Prints the number of all-gather calls, per decoding step, and the seconds per token, on rank 0.
The counts are what matters: on GPUs each all-gather is a latency-bound collective per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(model_dir: str, tokens: int) -> None:
    import deepspeed
    import numpy as np
    import torch.distributed as dist

    import train_ktr
    from common.launch import configure_deepspeed, make_accelerator
    from common.models import generate_exact, load_model, load_processor, model_inputs
    from common.video import Clip

    # Counted at the source, before DeepSpeed's comm layer keeps its own reference to the function.
    calls = {"n": 0}
    for name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)

    accelerator = make_accelerator()
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    policy = train_ktr.PolicyLogps(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    configure_deepspeed(accelerator, 1, 1.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    hf_model = accelerator.unwrap_model(policy).model.eval()
    frames = np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    clip = Clip(frames, list(range(0, 32, 4)), [i / 2 for i in range(8)], 8.0, 32)
    inputs = model_inputs(processor, ["What happens?"], [clip])
    # Every rank generates exactly `tokens` tokens (EOS banned), so the counts compare like with like.
    banned = [[processor.tokenizer.eos_token_id]]

    ways = {
        "sharded": contextlib.nullcontext,
        "gathered": lambda: deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None),
        "ours": lambda: train_ktr.gathered_for_generation(accelerator, policy),
    }
    results = {}
    for name, context in ways.items():
        outputs = []
        for _ in range(2):  # the first call warms up; the second is measured
            torch.manual_seed(0)
            calls["n"] = 0
            start = time.perf_counter()
            with torch.no_grad(), context():  # as train_ktr.py: without the hooks, no lockstep needed
                out = generate_exact(hf_model, inputs, max_new_tokens=tokens, do_sample=True, temperature=1.0,
                                     bad_words_ids=banned, synced_gpus=False if name == "ours" else None)
            seconds = time.perf_counter() - start
            outputs.append(out)
        hf_model.model.rope_deltas = None
        results[name] = (calls["n"], seconds, out)
    same = all(torch.equal(results["sharded"][2], r[2]) for r in results.values())
    if accelerator.is_main_process:
        print(f"{'way':<10}{'all-gathers':>12}{'per token':>11}{'s / token':>11}")
        for name, (n, seconds, _) in results.items():
            print(f"{name:<10}{n:>12}{n / tokens:>11.1f}{seconds / tokens:>11.4f}")
        print(f"same tokens all three ways: {same}")
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens)
        return
    import yaml

    from common.launch import cpu_launch_env, launch_command
    from common.models import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model")
        config = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
        config.update(num_processes=args.processes, mixed_precision="no")
        config_path = Path(tmp) / "zero3.yaml"
        config_path.write_text(yaml.safe_dump(config))
        cmd = launch_command(__file__, ["--worker", str(model_dir), "--tokens", str(args.tokens)],
                             num_processes=args.processes, accelerate_config=str(config_path),
                             main_process_port=29655)
        env = cpu_launch_env(deepspeed=True)
        env["PYTHONWARNINGS"] = "ignore"
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


if __name__ == "__main__":
    main()
