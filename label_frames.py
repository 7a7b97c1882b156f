"""Frame-Voyager labeling: rank frame combinations by a frozen Video-LLM's answer loss.

    python label_frames.py --config configs/label.yaml model=PATH data=FILE output_dir=DIR
    accelerate launch label_frames.py --config configs/label.yaml ...   # each process labels a shard

For every video sample: M candidate frames (uniform over the video), combinations of T of them (all of
them when C(M, T) <= max_combinations, else that many sampled), and for each combination the mean
cross-entropy of the reference answer tokens given those T frames and the question (teacher forcing,
no generation). Lower loss = the frames show what the answer needs. Output, in DIR:

    labels.jsonl    one record per sample: problem_id, path, candidate_indices (M frame numbers),
                    candidate_timestamps, combinations (T positions into the candidates, ascending),
                    losses, label_model, and the question (so train_voyager.py needs no data file)
    skipped.jsonl   samples not labeled, with the reason (unreadable video, image sample, flat losses)
    summary.json    counts, time, samples/s, the skipped samples

Rerunning with the same output_dir continues where an interruption stopped: append-only files, whole
lines flushed to disk, samples already written are skipped, so each sample ends up exactly once.

How it is fast (bench/bench_label.py compares with the straightforward processor + forward per
combination; the losses agree within 1e-4):

- the M candidates are decoded and preprocessed (resize, normalise, patchify) once per sample;
- the combinations are fed with the model's own temporal pairing: a combination (a, b, c, d) in
  temporal order is two temporal patches (a, b) and (c, d), exactly what the answering model sees at
  eval time, so labels and use agree. The vision tower attends within a temporal patch only, so each
  distinct patch is encoded once and reused by every combination containing it (at most C(M, 2)
  patches; fewer when combinations are sampled). We did not feed each frame as its own patch
  ([f, f]): it would make features per frame (M patches instead of up to C(M, 2)) but double the
  visual tokens in every LLM forward, which is where the time goes for real models, and label
  frames in a layout the answering model never sees. Where the tower encodes every frame alone
  (LLaVA-OneVision: `VideoFormat.frames_per_patch` = 1) a patch is one frame, so at most M are encoded;
  the learned newline it puts after every video's frames is the same for all and is kept once;
- where time is carried by RoPE alone (Qwen2-VL, Qwen2.5-VL) or by the frames' order alone
  (LLaVA-OneVision, 1-D positions), every combination of a sample has the same token sequence and the
  same RoPE positions (same T, same frame size; the processor spaces temporal positions by the number
  of sampled frames, not by which ones), so both are computed once and the batch differs only in the
  visual features scattered at the video placeholders; where the processor writes timestamps as text
  (Qwen3-VL's `<t seconds>`), each combination has its own tokens, so the processor lays out each
  batch's sequences (left-padded) and only the vision features are shared;
- a model's DeepStack features (Qwen3-VL) are cached with the main features of each temporal patch
  and injected into the first language layers as the model's own forward does;
- combinations run in batches of `batch_size`, and the LM head runs on the answer positions only.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations as all_combinations
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.config import parse_config, require, save_config
from common.data import Sample, build_prompt, build_target, load_samples, require_some_media
from common.frames import FramesConfig, require_pixel_budget
from common.jsonl import append_jsonl, merge_shards, read_jsonl, write_json
from common.launch import make_accelerator
from common.models import (
    chat_text,
    embed_visual,
    encode_visual,
    load_model,
    load_processor,
    model_inputs,
    model_path_ok,
    position_ids,
    video_format,
    video_max_pixels,
    visual_layout,
)
from common.video import Clip, VideoError, probe, read_frames
from common.voyager import subclip


@dataclass
class Config:
    model: str = "outputs/tiny/sft/final"  # the frozen Video-LLM whose answer loss ranks combinations
    data: str = "outputs/tiny/data/train.json"
    media_root: str = ""  # where relative media paths resolve; empty = the data file's directory
    output_dir: str = "outputs/tiny/labels"
    candidates: int = 16  # M candidate frames per video, uniform
    # Label each sample at one M of this list instead, drawn from a hash of (seed, problem_id), so a scorer that
    # will select at several M learns from each (e.g. [16, 32]); empty = `candidates` for every sample.
    mixed_candidates: list[int] = field(default_factory=list)
    num_frames: int = 4  # T frames per combination
    max_combinations: int = 128  # all C(M, T) combinations up to this many, else this many sampled
    refine_fraction: float = 0.25  # share of sampled combinations drawn towards low-loss frames (2nd round)
    target: Literal["answer", "reasoning_answer"] = "answer"  # tokens whose loss is recorded
    min_loss_spread: float = 0.0  # skip samples whose max - min loss is below this (no ranking signal)
    families: list[str] = field(default_factory=list)  # label only these question families; empty = all
    limit: int = 0  # label only the first N samples (after the family filter); 0 = all
    batch_size: int = 64  # combinations per forward
    # Pixel budget per frame (the processor's size["longest_edge"]); 0 = the model's saved default. Label
    # at the resolution the answering model sees at eval (its frames.max_pixels).
    max_pixels: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = ""
    seed: int = 0

    def validate(self) -> None:
        require(self.num_frames > 0, "num_frames", f"must be > 0, got {self.num_frames}")
        for key, ms in (("candidates", [self.candidates]), ("mixed_candidates", self.mixed_candidates)):
            for m in ms:
                require(m >= self.num_frames, key, f"M={m} must be >= num_frames T={self.num_frames}")
        require(self.max_combinations >= 2, "max_combinations", "need at least 2 combinations to rank")
        require(0.0 <= self.refine_fraction < 1.0, "refine_fraction", "must be in [0, 1)")
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        require_pixel_budget(self.max_pixels, "max_pixels")
        require(model_path_ok(self.model), "model", f"no such path: {self.model}")
        require(Path(self.data).is_file(), "data", f"no such file: {self.data}")


# ---------------------------------------------------------------------------------------------
# Which combinations
# ---------------------------------------------------------------------------------------------

def sample_seed(seed: int, problem_id: str) -> int:
    """A per-sample seed that does not depend on the shard or on what ran before (stable across resumes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:8], "little")


def balanced_combinations(m: int, t: int, k: int, rng: random.Random,
                          weights: Sequence[float] | None = None, exclude: set | None = None) -> list[tuple[int, ...]]:
    """Up to `k` distinct T-subsets of range(m), ascending; each frame used about equally often.

    Without weights, frames are drawn from a shuffled pool that is refilled only when empty, so every
    candidate appears in about k * t / m combinations: each frame's effect on the loss is observed
    often enough to rank it. With weights, frames are drawn proportionally to them (the refinement round).
    """
    exclude = set() if exclude is None else exclude
    out: list[tuple[int, ...]] = []
    pool: list[int] = []
    for _ in range(50 * k):  # attempts; duplicates are rejected
        if len(out) == k:
            break
        if weights is None:
            combo: set[int] = set()
            while len(combo) < t:
                if not pool:
                    pool = rng.sample(range(m), m)
                combo.add(pool.pop())
        else:
            combo = set()
            while len(combo) < t:
                combo.add(rng.choices(range(m), weights=weights)[0])
        key = tuple(sorted(combo))
        if key not in exclude:
            exclude.add(key)
            out.append(key)
    return out


def frame_weights(combos: Sequence[tuple[int, ...]], losses: Sequence[float], m: int,
                  temperature: float = 0.5) -> list[float]:
    """Sampling weights favouring frames whose combinations had low loss (softmax of -mean loss).

    A second round drawn with them covers the low end of the loss range, which uniform sampling
    reaches rarely when only a few of the M frames matter (a brief event).
    """
    total, count = np.zeros(m), np.zeros(m)
    for combo, loss in zip(combos, losses, strict=True):
        total[list(combo)] += loss
        count[list(combo)] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), np.mean(losses))
    weights = np.exp(-(mean - mean.min()) / (temperature * (np.std(losses) + 1e-6)))
    return list(weights + 1e-3)  # every frame stays possible


# ---------------------------------------------------------------------------------------------
# Losses: the straightforward way (reference) and the fast way
# ---------------------------------------------------------------------------------------------

def answer_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy per row; logits (B, n, V) predict targets (B, n)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return ce.mean(dim=1)


def target_text(sample: Sample, target: str) -> str:
    return build_target(sample, with_reasoning=target == "reasoning_answer")


def target_length(processor, prompt: str, target: str) -> int:
    """Tokens of target + end-of-turn: the last n tokens of every (left-padded) row are the answer."""
    tok = processor.tokenizer
    without = tok(chat_text(processor, prompt), add_special_tokens=False)["input_ids"]
    with_target = tok(chat_text(processor, prompt, target=target), add_special_tokens=False)["input_ids"]
    if with_target[: len(without)] != without:
        raise ValueError("the tokenizer merges the answer with the prompt's last token; cannot locate the answer")
    return len(with_target) - len(without)


@torch.no_grad()
def straightforward_losses(model, processor, clip: Clip, prompt: str, target: str,
                           combos: Sequence[tuple[int, ...]]) -> list[float]:
    """Reference: for each combination, the processor then a full forward of the model."""
    n = target_length(processor, prompt, target)
    losses = []
    for combo in combos:
        inputs = model_inputs(processor, [prompt], [subclip(clip, combo)], targets=[target]).to(model.device)
        logits = model(**inputs).logits
        losses.append(answer_losses(logits[:, -n - 1:-1], inputs["input_ids"][:, -n:]).item())
    return losses


class CombinationLabeler:
    """Answer losses of many combinations of one sample's candidates, sharing all the work they share.

    Built once per sample: per-frame pixel patches and a cache of vision-tower outputs per temporal
    patch (a tuple of candidate positions), DeepStack levels included. The token sequences: one for all
    combinations, built once, when the processor places time through RoPE only; per combination when it
    writes timestamps as text (`VideoFormat.timestamps_as_text`), since the `<t seconds>` tokens, and
    the length once times reach 10 s, depend on which frames are in it. Those come from the processor
    for each batch, left-padded (the answer stays the last tokens of every row).
    """

    def __init__(self, model, processor, clip: Clip, prompt: str, target: str, num_frames: int):
        self.model, self.processor = model, processor
        self.clip, self.prompt, self.target = clip, prompt, target
        self.tp, self.t = video_format(processor).frames_per_patch, num_frames
        self.video_end_tokens = visual_layout(model).video_end_tokens
        self.video_end: torch.Tensor | None = None  # the features after each video's frames (LLaVA's newline)
        self.frame_patches = self._frame_patches(clip)  # per candidate frame: (M, h*w, C, patch*patch) or (M, C, H, W)
        self.n_target = target_length(processor, prompt, target)
        self.shared_tokens = None
        if not video_format(processor).timestamps_as_text:  # one sequence for all: build it from any combination
            self.shared_tokens = self._token_inputs([tuple(range(num_frames))])
        self.patch_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _token_inputs(self, combos: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and RoPE position_ids of the combinations' sequences (left-padded)."""
        if self.shared_tokens is not None:
            ids, mask, positions = self.shared_tokens
            b = len(combos)
            return ids.expand(b, -1), mask.expand(b, -1), positions.expand(*positions.shape[:-2], b, -1)
        clips = [subclip(self.clip, c) for c in combos]
        inputs = model_inputs(self.processor, [self.prompt] * len(clips), clips,
                              targets=[self.target] * len(clips)).to(self.model.device)
        return inputs["input_ids"], inputs["attention_mask"], position_ids(self.model, inputs)

    def _frame_patches(self, clip: Clip) -> torch.Tensor:
        """Resize/normalise/patchify the candidates once and split the result back into single frames.

        Frames go through the video processor in videos of T frames (the candidates, padded cyclically
        to a multiple of T), so any frame-count-dependent resizing matches a T-frame combination. Without
        grids (LLaVA-OneVision) the processor's output is already (videos, frames, C, H, W).
        """
        m, t, tp = len(clip.indices), self.t, self.tp
        order = list(range(m)) + list(range(-m % t))
        videos = [clip.frames[order[i: i + t]] for i in range(0, len(order), t)]
        out = self.processor.video_processor(videos=videos, do_sample_frames=False, return_tensors="pt")
        if "video_grid_thw" not in out:
            self.grid_hw = None
            return out["pixel_values_videos"].flatten(0, 1)[:m]
        grid_t, grid_h, grid_w = out["video_grid_thw"][0].tolist()
        pixels = out["pixel_values_videos"]
        ps2 = self.processor.video_processor.patch_size ** 2
        channels = pixels.shape[1] // (tp * ps2)
        # rows: (video, temporal patch, spatial position); columns: (channel, frame in patch, pixel)
        pixels = pixels.view(len(videos), grid_t, grid_h * grid_w, channels, tp, ps2)
        frames = pixels.permute(0, 1, 4, 2, 3, 5).reshape(len(videos), grid_t * tp, grid_h * grid_w, channels, ps2)
        self.grid_hw = (grid_h, grid_w)
        return frames[:, :t].reshape(-1, grid_h * grid_w, channels, ps2)[:m]

    def temporal_patches(self, combo: Sequence[int]) -> list[tuple[int, ...]]:
        """The model's pairing: consecutive frames grouped by temporal_patch_size, the last group
        padded with its last frame (as the processor pads an odd frame count)."""
        groups = [tuple(combo[i: i + self.tp]) for i in range(0, len(combo), self.tp)]
        return [g + (g[-1],) * (self.tp - len(g)) for g in groups]

    def _encode(self, patches: list[tuple[int, ...]]) -> None:
        """Vision features of temporal patches not yet cached, in one tower call. Without grids each patch
        goes in as a video of its own; the features its video ends with (LLaVA's newline, the same for
        every video) are kept once, apart from the patch's."""
        todo = [p for p in dict.fromkeys(patches) if p not in self.patch_cache]
        if not todo:
            return
        pixels = self.frame_patches[torch.tensor(todo)].to(self.model.device)
        if self.grid_hw is None:  # (P, tp, C, H, W): P videos of one patch each
            features = encode_visual(self.model, pixels, None)
            n = self.video_end_tokens
            self.video_end = features[0][len(features[0]) - n:]
            self.patch_cache.update((p, f[: len(f) - n]) for p, f in zip(todo, features, strict=True))
            return
        h, w = self.grid_hw
        rows = pixels.permute(0, 2, 3, 1, 4).reshape(len(todo) * h * w, -1)  # (P, tp, h*w, C, ps2) -> processor rows
        grid = torch.tensor([[1, h, w]] * len(todo), device=self.model.device)
        self.patch_cache.update(zip(todo, encode_visual(self.model, rows, grid), strict=True))

    def _video_features(self, patches: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """What a combination's video placeholders take: its temporal patches' features, then the video's end."""
        return [self.patch_cache[p] for p in patches] + ([] if self.video_end is None else [self.video_end])

    @torch.no_grad()
    def losses(self, combos: Sequence[tuple[int, ...]], batch_size: int) -> list[float]:
        lm = self.model.model.language_model
        patches = [self.temporal_patches(c) for c in combos]
        self._encode([p for ps in patches for p in ps])
        n = self.n_target
        out = []
        for i in range(0, len(combos), batch_size):
            ids, mask, positions = self._token_inputs(combos[i: i + batch_size])
            visual = torch.cat([f for ps in patches[i: i + batch_size] for f in self._video_features(ps)])
            embeds, deepstack = embed_visual(self.model.get_input_embeddings()(ids),
                                             ids == self.model.config.video_token_id, visual)
            hidden = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, **deepstack)
            logits = self.model.lm_head(hidden.last_hidden_state[:, -n - 1: -1])
            out += answer_losses(logits, ids[:, -n:]).tolist()
        return out


def sample_candidates(cfg: Config, problem_id: str) -> int:
    """The M a sample is labeled at: `candidates`, or with `mixed_candidates` one of them by a hash of the sample
    (independent of its position, so not tied to a question family that the data cycles through)."""
    if not cfg.mixed_candidates:
        return cfg.candidates
    return cfg.mixed_candidates[sample_seed(cfg.seed, f"M:{problem_id}") % len(cfg.mixed_candidates)]


def label_sample(model, processor, sample: Sample, cfg: Config) -> dict:
    """Candidates, combinations and their losses for one sample (raises VideoError for broken videos)."""
    total, _ = probe(sample.path)
    if total < cfg.num_frames:
        raise VideoError(f"{sample.path}: {total} frames, fewer than num_frames={cfg.num_frames}")
    clip = read_frames(sample.path, num_frames=min(sample_candidates(cfg, sample.problem_id), total))  # distinct frames
    m, t = len(clip.indices), cfg.num_frames
    prompt, target = build_prompt(sample), target_text(sample, cfg.target)
    labeler = CombinationLabeler(model, processor, clip, prompt, target, t)
    if math.comb(m, t) <= cfg.max_combinations:
        combos = list(all_combinations(range(m), t))
        losses = labeler.losses(combos, cfg.batch_size)
    else:
        rng = random.Random(sample_seed(cfg.seed, sample.problem_id))
        n_refine = int(cfg.max_combinations * cfg.refine_fraction)
        seen: set = set()
        combos = balanced_combinations(m, t, cfg.max_combinations - n_refine, rng, exclude=seen)
        losses = labeler.losses(combos, cfg.batch_size)
        if n_refine:
            extra = balanced_combinations(m, t, n_refine, rng, weights=frame_weights(combos, losses, m), exclude=seen)
            combos, losses = combos + extra, losses + labeler.losses(extra, cfg.batch_size)
    return {"problem_id": sample.problem_id, "path": str(sample.path), "candidate_indices": clip.indices,
            "candidate_timestamps": [round(x, 4) for x in clip.timestamps], "fps": clip.fps,
            "total_frames": clip.total_frames, "combinations": [list(c) for c in combos],
            "losses": [round(x, 6) for x in losses], "label_model": cfg.model, "target": cfg.target,
            "max_pixels": video_max_pixels(processor),
            "problem": sample.problem, "options": sample.options, "problem_type": sample.problem_type,
            "question_family": sample.question_family, "evidence_frames": sample.evidence_frames}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def main() -> None:
    cfg = parse_config(Config)
    torch.manual_seed(cfg.seed)
    samples = load_samples(cfg.data, cfg.media_root or None)
    require_some_media(samples, cfg.data)
    if cfg.families:
        samples = [s for s in samples if s.question_family in cfg.families]
    samples = samples[: cfg.limit or None]
    accelerator = make_accelerator()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, out)
    rank = accelerator.process_index
    labels_path, skipped_path = out / f"labels.rank{rank}.jsonl", out / f"skipped.rank{rank}.jsonl"
    done = {r["problem_id"] for name in ("labels", "skipped")
            for p in [out / f"{name}.jsonl", *out.glob(f"{name}.rank*.jsonl")] for r in read_jsonl(p)}
    for path in (labels_path, skipped_path):
        read_jsonl(path, repair=True)  # cut a line left half-written by an interrupted run

    # Samples are dealt round-robin, so a sample's shard does not depend on what is already done.
    mine = [s for k, s in enumerate(samples)
            if k % accelerator.num_processes == rank and s.problem_id not in done]
    start, n_combos = time.time(), 0
    if mine:
        model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation or None, device=accelerator.device)
        model.eval()
        processor = load_processor(cfg.model, FramesConfig(max_pixels=cfg.max_pixels))
        bar = tqdm(mine, unit="sample", desc=f"label rank {rank}", disable=not accelerator.is_local_main_process)
        for sample in bar:
            if sample.data_type != "video":
                append_jsonl(skipped_path, [{"problem_id": sample.problem_id, "reason": "image sample"}])
                continue
            try:
                record = label_sample(model, processor, sample, cfg)
            except VideoError as e:
                append_jsonl(skipped_path, [{"problem_id": sample.problem_id, "reason": str(e)}])
                continue
            spread = max(record["losses"]) - min(record["losses"])
            if spread < cfg.min_loss_spread:
                append_jsonl(skipped_path, [{"problem_id": sample.problem_id,
                                             "reason": f"flat losses: spread {spread:.4g} < {cfg.min_loss_spread}"}])
                continue
            append_jsonl(labels_path, [record])
            n_combos += len(record["losses"])
            bar.set_postfix(combos=n_combos)
    elapsed = time.time() - start
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        order = [s.problem_id for s in samples]
        labels, skipped = merge_shards(out, "labels", order), merge_shards(out, "skipped", order)
        summary = {"samples": len(labels), "combinations": sum(len(r["losses"]) for r in labels),
                   "skipped": len(skipped), "skipped_samples": skipped, "label_model": cfg.model,
                   "data": cfg.data, "seconds_this_run": round(elapsed, 2), "samples_labeled_this_run": len(mine),
                   "samples_per_second_rank0": round(len(mine) / elapsed, 3) if mine and elapsed else None,
                   "time": time.strftime("%F %T")}
        write_json(out / "summary.json", summary)
        print(f"labeled {summary['samples']} samples ({summary['combinations']} combinations), "
              f"skipped {len(skipped)} -> {out / 'labels.jsonl'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
