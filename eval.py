"""Evaluate a Video-LLM on Video-R1-format data: choose frames -> answer -> score -> summarise.

    python eval.py --config configs/eval.yaml model=PATH data=FILE output_dir=DIR frames.strategy=uniform frames.num=8
    accelerate launch eval.py --config configs/eval.yaml ...      # each process answers a shard

Writes DIR/predictions.jsonl (one line per sample), DIR/summary.json and DIR/config.yaml.
Rerunning with the same output_dir skips the samples already answered; an interruption loses at
most the batch in flight. A sample whose video cannot be read is recorded as failed, with the
reason, and the run goes on.

Decoding is exactly `temperature` / `top_p` / `top_k` (0 = greedy), whatever the checkpoint's
generation_config.json says (common.models.generate_exact). With sampling, batch k is seeded from
(seed, k), so a rerun, a resumed run or a different number of processes gives the same predictions.

`num_samples=G` adds G answers per question sampled as RL rollouts are (`sample_temperature`,
`sample_top_p`): summary.json then reports the headroom RL has on this data (sampled accuracy, the
accuracy of the most frequent sampled answer, pass@G, the share of zero-advantage groups), per family.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from common.config import parse_config, require, save_config
from common.data import Sample, build_prompt, load_samples, require_some_media, solution_answer
from common.frames import FramesConfig, load_visual, make_selector
from common.jsonl import append_jsonl, merge_shards, read_jsonl, write_json
from common.launch import make_accelerator
from common.models import generate_exact, load_model, load_processor, model_inputs, model_path_ok, visual_tokens
from common.rewards import accuracy_reward, extract_answer
from common.video import VideoError


@dataclass
class Config:
    model: str = "outputs/tiny/sft/final"
    data: str = "outputs/tiny/data/test.json"
    media_root: str = ""  # where relative media paths resolve; empty = the data file's directory
    output_dir: str = "outputs/tiny/eval"
    frames: FramesConfig = field(default_factory=FramesConfig)
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; > 0 samples (seeded per batch)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # top-k sampling; 0 = off
    # Headroom for RL: G more answers per question, sampled as RL rollouts are (num_samples > 0); the summary
    # then says how often they are right, how often the most frequent one is, and how many groups of G
    # would have zero advantage (all right or all wrong).
    num_samples: int = 0
    sample_temperature: float = 1.0
    sample_top_p: float = 0.95
    sample_top_k: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = ""  # e.g. flash_attention_2 on GPUs; empty = transformers' default
    limit: int = 0  # evaluate only the first N samples (0 = all)
    seed: int = 0

    def validate(self) -> None:
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        require(self.num_samples >= 0, "num_samples", f"must be >= 0 (0 = none), got {self.num_samples}")
        if self.num_samples:
            require(self.sample_temperature > 0, "sample_temperature", f"must be > 0, got {self.sample_temperature}")
            require(0 < self.sample_top_p <= 1, "sample_top_p", f"must be in (0, 1], got {self.sample_top_p}")
            require(self.sample_top_k >= 0, "sample_top_k", f"must be >= 0 (0 = off), got {self.sample_top_k}")
        require(model_path_ok(self.model), "model", f"no such path: {self.model}")
        require(Path(self.data).is_file(), "data", f"no such file: {self.data}")
        self.frames.validate()

    def decoding(self) -> dict:
        """generate_exact's decoding arguments (also recorded in summary.json)."""
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


def answer_batch(model, processor, batch: list[Sample], select, cfg: Config, bad_words: list[list[int]]) -> list[dict]:
    """Frames, answers and rewards for one batch; unreadable media become failed rows."""
    rows, ready, visuals, frame_indices = [], [], [], []
    for sample in batch:
        try:
            visual = load_visual(sample, select)
        except VideoError as e:
            rows.append({"problem_id": sample.problem_id, "failed": True, "error": str(e), **describe(sample)})
            continue
        ready.append(sample)
        visuals.append(visual)
        frame_indices.append(list(visual.indices) if sample.data_type == "video" else [])
    if not ready:
        return rows
    inputs = model_inputs(processor, [build_prompt(s) for s in ready], visuals).to(model.device)
    with torch.no_grad():
        generated = generate_exact(model, inputs, bad_words_ids=bad_words, **cfg.decoding())
    texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    sampled = [[] for _ in ready]
    if cfg.num_samples:
        with torch.no_grad():
            generated = generate_exact(model, inputs, bad_words_ids=bad_words, max_new_tokens=cfg.max_new_tokens,
                                       do_sample=True, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p,
                                       top_k=cfg.sample_top_k, num_return_sequences=cfg.num_samples)
        flat = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        sampled = [flat[i * cfg.num_samples: (i + 1) * cfg.num_samples] for i in range(len(ready))]
    for sample, text, indices, samples_of in zip(ready, texts, frame_indices, sampled, strict=True):
        reward = accuracy_reward(text, sample.solution, sample.problem_type, mode="eval")
        evidence_hit = None if sample.evidence_frames is None else bool(set(indices) & set(sample.evidence_frames))
        row = {"problem_id": sample.problem_id, "output": text, "prediction": extract_answer(text),
               "answer": solution_answer(sample), "reward": reward, "correct": reward >= 1.0 - 1e-9,
               "frame_indices": indices, "evidence_hit": evidence_hit, **describe(sample)}
        if samples_of:
            row["sample_predictions"] = [extract_answer(t) for t in samples_of]
            row["sample_rewards"] = [accuracy_reward(t, sample.solution, sample.problem_type, mode="eval")
                                     for t in samples_of]
        rows.append(row)
    return rows


def describe(sample: Sample) -> dict:
    """The grouping keys a summary needs, so it can be rebuilt from predictions.jsonl alone."""
    return {"problem_type": sample.problem_type, "data_source": sample.data_source,
            "question_family": sample.question_family}


def summarize(rows: list[dict]) -> dict:
    scored = [r for r in rows if not r.get("failed")]
    failed = [r for r in rows if r.get("failed")]

    def group(key: str) -> dict:
        buckets = defaultdict(list)
        for r in scored:
            if r.get(key) is not None:
                buckets[r[key]].append(r["reward"])
        return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(buckets.items())}

    summary = {
        "n": len(rows),
        "n_failed": len(failed),
        "accuracy": sum(r["reward"] for r in scored) / len(scored) if scored else 0.0,
        "by_problem_type": group("problem_type"),
        "by_source": {"data_source": group("data_source"), "question_family": group("question_family")},
        "failures": [{"problem_id": r["problem_id"], "error": r["error"]} for r in failed],
    }
    with_samples = [r for r in scored if r.get("sample_rewards")]
    if with_samples:
        summary["sampled"] = {"overall": headroom(with_samples), "by_family": {
            family: headroom([r for r in with_samples if r.get("question_family") == family])
            for family in sorted({r["question_family"] for r in with_samples if r.get("question_family")})}}
    with_evidence = [r for r in scored if r.get("evidence_hit") is not None]
    if with_evidence:
        summary["evidence_recall"] = sum(r["evidence_hit"] for r in with_evidence) / len(with_evidence)
        by_family = defaultdict(list)
        for r in with_evidence:
            by_family[r.get("question_family") or "all"].append(r["evidence_hit"])
        summary["evidence_recall_by_family"] = {k: sum(v) / len(v) for k, v in sorted(by_family.items())}
    return summary


def headroom(rows: list[dict]) -> dict:
    """What RL on these questions can work with, from G sampled answers per question: the sampled
    accuracy (what the RL reward averages), pass@G, the accuracy of the most frequent sampled answer
    (what sharpening the sampling distribution turns greedy into; above greedy = room for RL), and the
    share of questions whose G rewards are all equal (zero advantage: no policy gradient)."""
    def mode_correct(r: dict) -> float:
        counts = Counter(p for p in r["sample_predictions"] if p is not None)
        if not counts:
            return 0.0
        top = counts.most_common(1)[0][0]
        return max(w for p, w in zip(r["sample_predictions"], r["sample_rewards"], strict=True) if p == top)

    n = len(rows)
    return {"n": n, "num_samples": len(rows[0]["sample_rewards"]),
            "greedy_accuracy": sum(r["reward"] for r in rows) / n,
            "sampled_accuracy": sum(sum(r["sample_rewards"]) / len(r["sample_rewards"]) for r in rows) / n,
            "pass_at_k": sum(max(r["sample_rewards"]) >= 1.0 - 1e-9 for r in rows) / n,
            "mode_accuracy": sum(mode_correct(r) for r in rows) / n,
            "zero_advantage_groups": sum(max(r["sample_rewards"]) == min(r["sample_rewards"]) for r in rows) / n}


def print_table(summary: dict, title: str) -> None:
    recall = summary.get("evidence_recall_by_family", {})
    print(f"\n{title}\n{'group':<28}{'n':>6}{'accuracy':>10}{'evidence':>10}")
    rows = [("all", {"n": summary["n"] - summary["n_failed"], "accuracy": summary["accuracy"]},
             summary.get("evidence_recall"))]
    rows += [(f"family: {k}", v, recall.get(k)) for k, v in summary["by_source"]["question_family"].items()]
    rows += [(f"type: {k}", v, None) for k, v in summary["by_problem_type"].items()]
    for name, v, ev in rows:
        print(f"{name:<28}{v['n']:>6}{v['accuracy']:>10.3f}{'' if ev is None else f'{ev:>10.3f}'}")
    if summary["n_failed"]:
        print(f"failed: {summary['n_failed']} (reasons in summary.json)")
    if "sampled" in summary:
        keys = ("greedy_accuracy", "sampled_accuracy", "mode_accuracy", "pass_at_k", "zero_advantage_groups")
        print(f"\nheadroom for RL ({summary['sampled']['overall']['num_samples']} samples per question)\n"
              f"{'group':<28}" + "".join(f"{k.replace('_accuracy', '').replace('_groups', ''):>16}" for k in keys))
        for name, h in [("all", summary["sampled"]["overall"]), *summary["sampled"]["by_family"].items()]:
            print(f"{name:<28}" + "".join(f"{h[k]:>16.3f}" for k in keys))


def main() -> None:
    cfg = parse_config(Config)
    samples = load_samples(cfg.data, cfg.media_root or None)[: cfg.limit or None]
    require_some_media(samples, cfg.data)
    accelerator = make_accelerator()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, out)
    merged_path, shard_path = out / "predictions.jsonl", out / f"predictions.rank{accelerator.process_index}.jsonl"
    done = {r["problem_id"] for p in [merged_path, *out.glob("predictions.rank*.jsonl")] for r in read_jsonl(p)}
    read_jsonl(shard_path, repair=True)  # cut a line left half-written by an interrupted run

    # Batches are fixed over the whole dataset and dealt round-robin to processes, so a batch
    # holds the same samples (and padding) whatever the number of processes.
    batches = [samples[i: i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    mine = [(k, [s for s in b if s.problem_id not in done]) for k, b in enumerate(batches)
            if k % accelerator.num_processes == accelerator.process_index]
    mine = [(k, b) for k, b in mine if b]
    if mine:
        model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation or None, device=accelerator.device)
        model.eval()
        processor = load_processor(cfg.model, cfg.frames)
        select = make_selector(cfg.frames, model=model, processor=processor)
        bad_words = [[t] for t in visual_tokens(model.config).placeholders]
        bar = tqdm(total=sum(len(b) for _, b in mine), unit="sample", desc=f"eval rank {accelerator.process_index}",
                   disable=not accelerator.is_local_main_process)
        for k, batch in mine:
            # The batch's own seed: sampled answers do not depend on what ran before it on this process.
            torch.manual_seed(cfg.seed * 1_000_003 + k)
            append_jsonl(shard_path, answer_batch(model, processor, batch, select, cfg, bad_words))
            bar.update(len(batch))
        bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merge_shards(out, "predictions", [s.problem_id for s in samples])
        summary = summarize(read_jsonl(merged_path))
        decoding = {**cfg.decoding(), "seed": cfg.seed}
        if cfg.num_samples:
            decoding["samples"] = {"num_samples": cfg.num_samples, "temperature": cfg.sample_temperature,
                                   "top_p": cfg.sample_top_p, "top_k": cfg.sample_top_k}
        summary.update(model=cfg.model, data=cfg.data, frames=cfg.frames.strategy, decoding=decoding,
                       time=time.strftime("%F %T"))
        write_json(out / "summary.json", summary)
        print_table(summary, f"{cfg.model} on {cfg.data} (frames: {cfg.frames.strategy})")
        print(f"predictions -> {merged_path}\nsummary -> {out / 'summary.json'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
