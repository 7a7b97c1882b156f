"""GRPO with key-token reinforcement (Video-KTR) for a Video-LLM, written out top to bottom.

    accelerate launch train_ktr.py --config configs/ktr.yaml      # Video-KTR
    accelerate launch train_ktr.py --config configs/grpo.yaml     # the same with every signal off = GRPO

Each step, for a batch of prompts:
  rollout      sample G completions per prompt, the prompt encoded once (common.sampling; the visual
               placeholder tokens can never be generated)
  rewards      accuracy + format (+ optional length bonus) -> group-normalised advantages
  attribution  per completion token: visual score  = logp(real) - logp(visual tokens removed)
                                     temporal score = logp(real) - logp(temporal patches shuffled)
                                     entropy of the policy
  key tokens   union over signals of the tokens at or above each signal's (1 - ratio) quantile
  loss         GRPO (clipped ratio, k3 KL to a reference when beta > 0) on key tokens only
  update       optimizer step; metrics, token logs and attribution.html; checkpoints

Writes DIR/metrics.jsonl, DIR/tokens.jsonl (which tokens each signal selected), DIR/attribution.html,
DIR/checkpoints/step_N (resumable) and DIR/final (loadable by eval.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common.attribution import (
    Rollout,
    VisualFeatures,
    build_rollout,
    completion_mask_from,
    counterfactual_logps,
    permute_temporal_patches,
    policy_logps,
    prefix_shared_logps,
    shuffle_frames,
    temporal_permutation,
    visual_features,
)
from common.checkpoint import latest_checkpoint, load_progress, save_checkpoint
from common.config import parse_config, require, save_config
from common.data import Sample, build_prompt, epoch_batches, load_samples, require_some_media
from common.frames import FramesConfig, load_batch, make_selector
from common.grpo import counterfactual_scores, gradient_share, group_advantages, grpo_loss, key_token_mask
from common.jsonl import append_jsonl, drop_steps_after, read_jsonl, write_json
from common.launch import configure_deepspeed, make_accelerator
from common.models import (
    load_model,
    load_processor,
    model_inputs,
    model_path_ok,
    visual_layout,
    visual_tokens,
)
from common.report import (
    TRACKERS,
    prompt_key,
    prompt_media,
    selection_summary,
    start_trackers,
    tracker_scalars,
    write_attribution_html,
)
from common.rewards import accuracy_reward, format_reward, length_reward
from common.sampling import sample_completions


@dataclass
class AttributionConfig:
    visual: bool = True  # visual-aware tokens: counterfactual removal of the visual input
    visual_ratio: float = 0.2
    visual_removal: Literal["mask", "pixels"] = "mask"  # drop visual tokens (= attention mask) or blank pixels
    temporal: bool = True  # temporal-aware tokens: perturbed frame order (video samples only)
    temporal_ratio: float = 0.2
    # shuffle / reverse / segment_shuffle move whole temporal patches of the cached features (exact, no
    # re-encoding); frame_shuffle permutes single frames, as the reference code does, and re-encodes once
    temporal_mode: Literal["shuffle", "reverse", "segment_shuffle", "frame_shuffle"] = "shuffle"
    temporal_segments: int = 4
    entropy: bool = True  # high-entropy tokens
    entropy_ratio: float = 0.2
    score: Literal["signed", "absolute"] = "signed"  # signed = the paper's code
    scope: Literal["group", "sequence", "batch"] = "group"  # where the quantile is taken
    chunk_size: int = 64  # completion positions per log-prob chunk


@dataclass
class RewardConfig:
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    length_bonus: float = 0.0  # e.g. 0.2 for correct answers whose length is in [length_min, length_max]
    length_min: int = 32
    length_max: int = 256
    length_unit: Literal["words", "tokens"] = "words"  # Video-R1: tokens, 320..512


@dataclass
class Config:
    model: str = "outputs/tiny/sft/final"
    data: str = "outputs/tiny/data/train.json"
    media_root: str = ""
    output_dir: str = "outputs/tiny/ktr"
    frames: FramesConfig = field(default_factory=FramesConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    num_generations: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = off; sampling uses exactly temperature / top_p / top_k, whatever the checkpoint ships
    max_new_tokens: int = 768
    batch_size: int = 1  # prompts per process per step
    max_steps: int = 0  # length of the schedule; 0 = one pass over the data
    stop_after: int = 0  # exit with a resumable checkpoint after this many steps (e.g. a job's time slot); 0 = never
    lr: float = 2e-6
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_grad_norm: float = 5.0
    beta: float = 0.04  # KL weight; 0 = no reference model at all
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1  # updates per generated batch (PPO-style reuse)
    aggregation: Literal["sequence_mean", "token_mean", "constant"] = "sequence_mean"
    kl_on_all_tokens: bool = False  # false = the KL term is masked like the policy term
    kl_clamp: float = 0.0  # clamp the log-ratio to [-kl_clamp, kl_clamp] before k3 (the reference code: 10); 0 = off
    bf16: bool = False
    gradient_checkpointing: bool = False
    # The policy's forward and the reference pass run each prompt once and repeat its KV cache for its G
    # completions (as the rollout and the attribution passes always do), instead of one forward over all B*G
    # full rows. Equal up to float rounding (tests, gradient checkpointing included); the prompts' work drops
    # G-fold. Both passes switch together, so the KL stays exactly 0 while the policy equals the reference. The
    # first step checks it against the full forward once and stops if they differ (`check_prefix_sharing`).
    prefix_sharing: bool = False
    freeze_vision: bool = True
    attn_implementation: str = ""
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    token_log_every: int = 1  # write which tokens were selected every N steps (0 = never)
    html_samples: int = 12  # completions shown in attribution.html
    scale_advantages: bool = True  # false = Dr. GRPO: advantages centred in the group, not divided by its std
    dynamic_sampling: int = 0  # DAPO: rounds of replacing zero-advantage groups by fresh prompts (0 = off)
    on_bad_video: Literal["skip", "stop"] = "skip"
    trackers: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb]
    resume: bool = True
    seed: int = 0

    def validate(self) -> None:
        require(model_path_ok(self.model), "model", f"no such path: {self.model}")
        require(Path(self.data).is_file(), "data", f"no such file: {self.data}")
        for key in ("visual_ratio", "temporal_ratio", "entropy_ratio"):
            value = getattr(self.attribution, key)
            require(0 <= value <= 1, f"attribution.{key}", f"must be in [0, 1], got {value}")
        require(self.attribution.chunk_size > 0, "attribution.chunk_size", "must be > 0")
        require(self.num_generations >= 2, "num_generations", f"GRPO needs >= 2 per prompt, got {self.num_generations}")
        for key in ("batch_size", "max_new_tokens", "num_iterations", "log_every"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        require(self.stop_after >= 0, "stop_after", f"must be >= 0, got {self.stop_after}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        require(self.epsilon >= 0, "epsilon", f"must be >= 0, got {self.epsilon}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(self.dynamic_sampling >= 0, "dynamic_sampling", f"must be >= 0 (0 = off), got {self.dynamic_sampling}")
        require(self.kl_clamp >= 0, "kl_clamp", f"must be >= 0 (0 = off), got {self.kl_clamp}")
        require(set(self.trackers) <= set(TRACKERS), "trackers", f"each must be one of {TRACKERS}, got {self.trackers}")
        self.frames.validate()

    @property
    def signal_ratios(self) -> dict[str, float]:
        a = self.attribution
        return {name: ratio for name, on, ratio in (("visual", a.visual, a.visual_ratio),
                                                    ("temporal", a.temporal, a.temporal_ratio),
                                                    ("entropy", a.entropy, a.entropy_ratio)) if on and ratio > 0}


class PolicyLogps(torch.nn.Module):
    """The policy's forward for the loss: completion log-probs and entropies with the visual
    features encoded once per prompt. Wrapping it (rather than calling submodules of the HF model)
    lets DDP / DeepSpeed see one forward per step and synchronise gradients."""

    def __init__(self, model, shared_prefix: bool = False):
        super().__init__()
        self.model, self.shared_prefix = model, shared_prefix

    def forward(self, rollout: Rollout, chunk_size: int, with_entropy: bool):
        features = visual_features(self.model, rollout.visual_inputs)
        if self.shared_prefix:  # each prompt once, its KV cache repeated for its G completions
            logps, entropy = prefix_shared_logps(self.model, rollout, features, False, chunk_size, with_entropy)
        else:
            logps, entropy = policy_logps(self.model, rollout, features, chunk_size, with_entropy)
        return logps, entropy, features


def rewards_of(completions: list[str], samples: list, n_tokens: list[int], cfg: Config) -> dict[str, torch.Tensor]:
    """Each reward function's value per completion (the samples are repeated G times)."""
    accuracy = [accuracy_reward(c, s.solution, s.problem_type) for c, s in zip(completions, samples, strict=True)]
    out = {"accuracy": torch.tensor(accuracy), "format": torch.tensor([format_reward(c) for c in completions])}
    r = cfg.reward
    if r.length_bonus:
        out["length"] = torch.tensor([
            length_reward(c, a, r.length_min, r.length_max, r.length_bonus,
                          n_tokens=n if r.length_unit == "tokens" else None)
            for c, a, n in zip(completions, accuracy, n_tokens, strict=True)])
    return out


@dataclass
class Group:
    """One prompt's G sampled completions and their rewards."""

    sample: Sample
    visual: object  # the Clip or image the prompt was built with
    completion_ids: torch.Tensor  # (G, L) on the CPU, right-padded after each completion's end
    completions: list[str]
    reward_parts: dict[str, torch.Tensor]  # each reward function's (G,) values
    rewards: torch.Tensor  # (G,) weighted sum

    @property
    def informative(self) -> bool:
        """Rewards that differ within the group: the only groups with a policy gradient."""
        return bool(self.rewards.max() > self.rewards.min())


def sample_groups(model, processor, eos_ids: list[int], cfg: Config, batch: list[Sample], visuals: list
                  ) -> tuple[list[Group], object]:
    """G completions per prompt, sampled with exactly the config's decoding (the visual placeholders
    banned), decoded and rewarded. Returns the groups and the batch's processor inputs (left-padded)."""
    prompt_inputs = model_inputs(processor, [build_prompt(s) for s in batch], visuals).to(model.device)
    # What generate(num_return_sequences=G) samples, token for token, with each prompt encoded once.
    completion_ids = sample_completions(
        model, prompt_inputs, cfg.num_generations, max_new_tokens=cfg.max_new_tokens, eos_ids=eos_ids,
        pad_token_id=processor.tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        banned_ids=visual_tokens(model.config).placeholders).cpu()
    lengths = completion_mask_from(completion_ids, eos_ids).sum(dim=1).tolist()
    completions = [processor.tokenizer.decode(row[:n], skip_special_tokens=True)
                   for row, n in zip(completion_ids.tolist(), lengths, strict=True)]
    repeated = [s for s in batch for _ in range(cfg.num_generations)]
    parts = rewards_of(completions, repeated, lengths, cfg)
    weights = {"accuracy": cfg.reward.accuracy_weight, "format": cfg.reward.format_weight, "length": 1.0}
    rewards = sum(weights[k] * v for k, v in parts.items())
    g = cfg.num_generations
    groups = [Group(s, v, completion_ids[i * g: (i + 1) * g], completions[i * g: (i + 1) * g],
                    {k: p[i * g: (i + 1) * g] for k, p in parts.items()}, rewards[i * g: (i + 1) * g])
              for i, (s, v) in enumerate(zip(batch, visuals, strict=True))]
    return groups, prompt_inputs


@contextlib.contextmanager
def gathered_for_generation(accelerator, policy):
    """Under ZeRO-3 the parameters are sharded; generation needs them whole on every rank. They are
    gathered once for the call, and DeepSpeed's per-module hooks are taken off meanwhile: left on,
    they release and re-gather every layer at every decoding step (GatheredParameters alone does not
    stop that; bench/bench_zero3_generation.py counts the all-gathers), and ranks that finish early
    would have to keep stepping in lockstep. Without the hooks each rank generates on its own."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed

    offload = policy.optimizer.parameter_offload  # the engine's ZeRO-3 parameter coordinator and hooks
    with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


def prepare_reference(accelerator, model):
    """The frozen reference model, placed like the policy: under ZeRO-3 its parameters are sharded
    across ranks too (a parameter-only DeepSpeed engine, no optimizer; modules gather their weights
    when called), otherwise it is whole on each device."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return model.to(accelerator.device)
    import deepspeed

    config = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    accelerator.print(f"reference model sharded by ZeRO-3: {local} of {total} parameters on rank 0")
    return engine.module.eval()


def any_rank(accelerator, flag: bool) -> bool:
    """True when `flag` holds on at least one process (every process gets the same answer)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


PREFIX_CHECK_TOLERANCE = 0.05  # mean |log-prob difference| per token. Measured on CPU: below 1e-5 in float32,
# 0 in bf16 (tests); a cache that the layers misread (tests): up to 1 on a token.


@torch.no_grad()
def check_prefix_sharing(accelerator, model, rollout: Rollout, features, logps: torch.Tensor, chunk_size: int) -> float:
    """prefix_sharing, once per run: the first step's policy log-probs against one full forward over all B*G
    rows. They agree up to rounding (tests, on CPU); an attention kernel that read the prompts' padding or KV
    cache differently would not, silently, since both the policy and the reference would share the error. The
    mean absolute difference over every rank's completion tokens; all ranks stop together above the tolerance."""
    full, _ = policy_logps(model, rollout, features, chunk_size, False)
    valid = rollout.completion_mask
    total = torch.tensor([(full.float() - logps.float()).abs()[valid].sum().item(), valid.sum().item()],
                         device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    gap = (total[0] / total[1].clamp(min=1)).item()
    if gap > PREFIX_CHECK_TOLERANCE:
        raise RuntimeError(f"prefix_sharing: the first step's log-probs differ from the full forward's by {gap:.4f} "
                           f"per token on average (tolerance {PREFIX_CHECK_TOLERANCE}); this model or attention "
                           "implementation does not support it here: set prefix_sharing=false")
    accelerator.print(f"prefix_sharing: the first step's log-probs are within {gap:.1e} per token of the full forward")
    return gap


def signal_overlaps(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Jaccard overlap of each pair of signals' selections."""
    out = {}
    for (a, ma), (b, mb) in itertools.combinations(sorted(masks.items()), 2):
        union = (ma | mb).sum().item()
        out[f"overlap/{a}_{b}"] = (ma & mb).sum().item() / union if union else 0.0
    return out


def main() -> None:
    cfg = parse_config(Config)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                   log_with=cfg.trackers or None, project_dir=str(out))
    samples = load_samples(cfg.data, cfg.media_root or None)
    require_some_media(samples, cfg.data)
    select = make_selector(cfg.frames)
    if accelerator.is_main_process:
        save_config(cfg, out)
    start_trackers(accelerator, cfg, "train_ktr", out)
    resume_from = latest_checkpoint(out) if cfg.resume else None

    model = load_model(resume_from or cfg.model, attn_implementation=cfg.attn_implementation or None)
    require_video_prompts(model, samples, cfg.data)  # before any work, for a family whose images the passes can't take
    processor = load_processor(cfg.model, cfg.frames)
    tokenizer = processor.tokenizer
    eos_ids = sorted({tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()})
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if cfg.freeze_vision:
        model.get_encoder("video").requires_grad_(False)

    steps_per_epoch = len(epoch_batches(len(samples), cfg.batch_size, accelerator.num_processes, 0, cfg.seed, 0))
    require(steps_per_epoch > 0, "batch_size", f"{len(samples)} samples are fewer than one global batch")
    total_steps = cfg.max_steps or steps_per_epoch
    policy = PolicyLogps(model, shared_prefix=cfg.prefix_sharing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    configure_deepspeed(accelerator, cfg.batch_size * cfg.num_generations, cfg.max_grad_norm)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    hf_model = accelerator.unwrap_model(policy).model  # the same parameters, for generate() and no-grad passes
    ref_model = None
    if cfg.beta > 0:  # the starting policy, frozen (loaded from cfg.model, also when resuming)
        ref_model = prepare_reference(accelerator, load_model(cfg.model, attn_implementation=cfg.attn_implementation
                                                              or None).eval().requires_grad_(False))

    step, prefix_checked = 0, False
    if resume_from is not None:
        step = load_progress(accelerator, resume_from)["step"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:  # rows a killed run logged after its last checkpoint are logged again
        for name in ("metrics.jsonl", "tokens.jsonl"):
            drop_steps_after(out / name, step)

    html_records: list[dict] = []  # the last groups' token rows, and their frames keyed by prompt_key
    html_media: dict[str, dict] = {}
    bar = tqdm(total=total_steps, initial=step, desc="ktr" if cfg.signal_ratios else "grpo", unit="step",
               disable=not accelerator.is_main_process)
    while step < total_steps:
        # Everything random in a step is seeded by (seed, step, rank): a resumed run repeats it exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
        epoch, in_epoch = divmod(step, steps_per_epoch)
        indices = epoch_batches(len(samples), cfg.batch_size, accelerator.num_processes,
                                accelerator.process_index, cfg.seed, epoch)[in_epoch]
        timings = {}

        # ---- rollout: G completions per prompt ----------------------------------------------
        t0 = time.time()
        batch, visuals = load_batch([samples[i] for i in indices], select, cfg.on_bad_video,
                                    out / "skipped.jsonl", step=step)
        # A process left with no readable sample cannot take part in the step, and the others cannot
        # run it without it (their collectives would wait for it): every process skips the step.
        if any_rank(accelerator, not batch):
            accelerator.print(f"step {step + 1}: skipped, a batch had no readable sample (see skipped.jsonl)")
            step += 1
            bar.update(1)
            continue
        hf_model.eval()
        # One gather for the whole rollout under ZeRO-3 (a collective), however many rounds a rank samples.
        with torch.no_grad(), accelerator.autocast(), gathered_for_generation(accelerator, policy):
            groups, prompt_inputs = sample_groups(hf_model, processor, eos_ids, cfg, batch, visuals)
            zero_advantage_sampled = sum(not g.informative for g in groups) / len(groups)
            # DAPO's dynamic sampling: a group whose G rewards are all equal gives no policy gradient, so
            # it is replaced by a group for a fresh prompt, for at most `dynamic_sampling` rounds.
            rounds = 0
            while rounds < cfg.dynamic_sampling and not all(g.informative for g in groups):
                rounds += 1
                missing = sum(not g.informative for g in groups)
                picks = np.random.default_rng([cfg.seed, step, accelerator.process_index, rounds]).choice(
                    len(samples), missing, replace=False)
                extra, extra_visuals = load_batch([samples[i] for i in picks], select, cfg.on_bad_video,
                                                  out / "skipped.jsonl", step=step)
                fresh = sample_groups(hf_model, processor, eos_ids, cfg, extra, extra_visuals)[0] if extra else []
                ranked = sorted(groups + fresh, key=lambda g: not g.informative)  # stable: informative first
                groups, prompt_inputs = ranked[: len(groups)], None
        hf_model.train()
        batch = [g.sample for g in groups]
        if prompt_inputs is None:  # the groups changed: the prompts of the groups kept
            prompt_inputs = model_inputs(processor, [build_prompt(s) for s in batch], [g.visual for g in groups])
        prompt_inputs = prompt_inputs.to(accelerator.device)
        width = max(g.completion_ids.shape[1] for g in groups)
        # Every process pads its completions to the longest on any process, so that all of them make
        # the same number of chunked output-layer calls (under ZeRO-3 each call is a collective).
        lengths_by_rank = [width]
        if accelerator.num_processes > 1:
            lengths_by_rank = accelerator.gather(torch.tensor([width], device=accelerator.device)).tolist()
        completion_ids = torch.cat([torch.nn.functional.pad(g.completion_ids, (0, width - g.completion_ids.shape[1]),
                                                            value=tokenizer.pad_token_id) for g in groups])
        rollout = build_rollout(hf_model, prompt_inputs, completion_ids.to(accelerator.device), cfg.num_generations,
                                eos_ids, temperature=cfg.temperature, pad_to=max(lengths_by_rank),
                                pad_token_id=tokenizer.pad_token_id)
        completions = [c for g in groups for c in g.completions]
        timings["generation"] = time.time() - t0

        # ---- rewards -> group-normalised advantages ------------------------------------------
        reward_parts = {k: torch.cat([g.reward_parts[k] for g in groups]) for k in groups[0].reward_parts}
        rewards = torch.cat([g.rewards for g in groups]).to(accelerator.device)
        advantages = group_advantages(rewards, cfg.num_generations, scale=cfg.scale_advantages)

        # ---- policy forward + attribution signals -> key-token mask ---------------------------
        # Every pass runs in the configured precision (autocast), the policy's as well as the no-grad ones.
        t0 = time.time()
        with accelerator.autocast():
            logps, entropy, features = policy(rollout, cfg.attribution.chunk_size, "entropy" in cfg.signal_ratios)
        scores, orders = {}, []  # orders: each video's frame order in the temporal counterfactual (the page)
        with torch.no_grad(), accelerator.autocast():
            features = dataclasses.replace(features, video=[f.detach() for f in features.video],
                                           image=[f.detach() for f in features.image])
            if cfg.prefix_sharing and not prefix_checked:
                check_prefix_sharing(accelerator, hf_model, rollout, features, logps.detach(),
                                     cfg.attribution.chunk_size)
                prefix_checked = True
            if "visual" in cfg.signal_ratios or "temporal" in cfg.signal_ratios:
                # The real log-probs of a score come from the same computation as its counterfactual,
                # so an unperturbed input scores exactly 0 in any precision.
                real_logps = counterfactual_logps(hf_model, rollout, features, drop_visual=False,
                                                  chunk_size=cfg.attribution.chunk_size)
            if "visual" in cfg.signal_ratios:
                scores["visual"] = counterfactual_scores(real_logps, visual_removed_logps(hf_model, rollout, features,
                                                                                          cfg), cfg.attribution.score)
            if "temporal" in cfg.signal_ratios and any_rank(accelerator, "video" in rollout.kinds):
                scores["temporal"] = temporal_scores(hf_model, rollout, features, real_logps, cfg, step, orders)
            elif "temporal" in cfg.signal_ratios:  # images only: no temporal signal, nothing selected by it
                scores["temporal"] = torch.full_like(real_logps, math.nan)
            if "entropy" in cfg.signal_ratios:
                scores["entropy"] = entropy
            key_mask, signal_masks = key_token_mask(scores, cfg.signal_ratios, rollout.completion_mask,
                                                    cfg.num_generations, cfg.attribution.scope)
            ref_logps = None
            if ref_model is not None:
                ref_features = visual_features(ref_model, rollout.visual_inputs)
                if cfg.prefix_sharing:  # the policy's computation, so the KL is 0 where the two models agree
                    ref_logps = counterfactual_logps(ref_model, rollout, ref_features, drop_visual=False,
                                                     chunk_size=cfg.attribution.chunk_size)
                else:
                    ref_logps, _ = policy_logps(ref_model, rollout, ref_features, cfg.attribution.chunk_size, False)
        timings["attribution"] = time.time() - t0

        # ---- loss on key tokens -> update (num_iterations > 1 reuses the batch) ---------------
        t0 = time.time()
        old_logps = logps.detach() if cfg.num_iterations > 1 else None
        for iteration in range(cfg.num_iterations):
            if iteration > 0:
                with accelerator.autocast():
                    logps, _, _ = policy(rollout, cfg.attribution.chunk_size, False)
            loss, loss_metrics = grpo_loss(
                logps, old_logps, ref_logps, advantages, rollout.completion_mask, key_mask, beta=cfg.beta,
                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, aggregation=cfg.aggregation,
                max_completion_length=cfg.max_new_tokens, kl_on_all_tokens=cfg.kl_on_all_tokens,
                kl_clamp=cfg.kl_clamp or None)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()  # one schedule step per rollout batch, however many updates reuse it
        timings["update"] = time.time() - t0
        step += 1
        bar.update(1)

        # ---- what a researcher sees ---------------------------------------------------------
        valid = rollout.completion_mask
        # The share of GRPO's per-token gradient, |A| (1 - p), on each signal's tokens and on their union: how
        # much of plain GRPO's update KTR keeps (README, "Where GRPO's gradient already is").
        shares = {} if key_mask is None else gradient_share(logps, advantages, valid,
                                                             {**signal_masks, "union": key_mask})
        group_acc = reward_parts["accuracy"].view(-1, cfg.num_generations)
        metrics = {
            "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            **{f"reward/{k}": v.mean().item() for k, v in reward_parts.items()},
            "accuracy": reward_parts["accuracy"].mean().item(),
            "completion_length": valid.sum(dim=1).float().mean().item(),
            "completion_length_by_rank": lengths_by_rank,  # generated lengths before padding to the longest
            "all_correct_groups": (group_acc == 1).all(dim=1).float().mean().item(),
            "all_wrong_groups": (group_acc == 0).all(dim=1).float().mean().item(),
            "zero_advantage_groups_sampled": zero_advantage_sampled,  # before dynamic sampling replaced any
            "dynamic_sampling_rounds": rounds,
            "selected/union": (key_mask & valid).sum().item() / valid.sum().item() if key_mask is not None else 1.0,
            **{f"selected/{k}": (m & valid).sum().item() / valid.sum().item() for k, m in signal_masks.items()},
            **{f"gradient_share/{k}": v for k, v in shares.items()},
            **signal_overlaps(signal_masks), **loss_metrics,
            **{f"time/{k}": v for k, v in timings.items()},
        }
        metrics = gather_mean(accelerator, metrics)
        if accelerator.is_main_process:
            if step % cfg.log_every == 0 or step == total_steps:
                append_jsonl(out / "metrics.jsonl", [metrics])
                if cfg.trackers:
                    accelerator.log(tracker_scalars(metrics), step=step)
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", sel=f"{metrics['selected/union']:.2f}")
            if cfg.token_log_every and step % cfg.token_log_every == 0:
                rows = token_rows(tokenizer, batch, rollout, completions, reward_parts, scores, signal_masks, step,
                                  advantages)
                append_jsonl(out / "tokens.jsonl", rows)
                html_records, html_media = page_groups(html_records, html_media, rows, groups, rollout.kinds, orders,
                                                       cfg)
        stopping = cfg.stop_after and step >= cfg.stop_after and step < total_steps
        if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or stopping:
            save_checkpoint(accelerator, policy, processor, out / "checkpoints" / f"step_{step:06d}",
                            progress={"step": step}, keep=cfg.keep_checkpoints)
        if stopping:
            accelerator.print(f"stopped after step {step} (stop_after); rerun to resume")
            return
    bar.close()
    check_replicas_agree(accelerator, policy, out)
    save_checkpoint(accelerator, policy, processor, out / "final")
    if accelerator.is_main_process:
        write_attribution_html(html_records, out / "attribution.html", title=f"{out.name}: key tokens",
                               media=html_media, summary=selection_summary(read_jsonl(out / "tokens.jsonl")))
        print(f"final model -> {out / 'final'}\nmetrics -> {out / 'metrics.jsonl'}\n"
              f"token attributions -> {out / 'attribution.html'}")
    accelerator.end_training()


def visual_removed_logps(model, rollout: Rollout, features: VisualFeatures, cfg: Config) -> torch.Tensor:
    """logp(token | visual input removed): dropped tokens (= masked from attention, positions kept),
    or the visual input replaced by blank pixels (re-encoded once)."""
    if cfg.attribution.visual_removal == "mask":
        return counterfactual_logps(model, rollout, None, drop_visual=True, chunk_size=cfg.attribution.chunk_size)
    blank = {k: torch.zeros_like(v) if k.startswith("pixel_values") else v for k, v in rollout.visual_inputs.items()}
    blank_features = visual_features(model, blank)
    return counterfactual_logps(model, rollout, blank_features, drop_visual=False,
                                chunk_size=cfg.attribution.chunk_size)


def temporal_scores(model, rollout: Rollout, features: VisualFeatures, real_logps: torch.Tensor, cfg: Config,
                    step: int, orders: list | None = None) -> torch.Tensor:
    """logp(real order) - logp(perturbed order). Whole temporal patches of the cached vision features
    are permuted (no re-encoding), or for frame_shuffle single frames are, and the videos re-encoded
    once. Image prompts have no temporal signal: NaN, never selected. `orders`, if given, receives each
    video's perturbed order as frame positions (position i showed frame orders[v][i]), for the page."""
    a = cfg.attribution
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    frames_per_patch = visual_layout(model).frames_per_patch
    if a.temporal_mode == "frame_shuffle" and frames_per_patch > 1:  # pairs broken: re-encode
        perms = [temporal_permutation(t * frames_per_patch, "frame_shuffle", generator) for t in features.video_patches]
        perturbed = visual_features(model, shuffle_frames(model, rollout.visual_inputs, perms))
    else:  # whole patches of the cached features; with one frame per patch (LLaVA) that is frame_shuffle, exactly
        mode = "shuffle" if a.temporal_mode == "frame_shuffle" else a.temporal_mode
        perms = [temporal_permutation(t, mode, generator, a.temporal_segments) for t in features.video_patches]
        perturbed = permute_temporal_patches(features, perms)
    if orders is not None:  # frame positions: a temporal patch holds frames_per_patch consecutive frames
        unit = 1 if a.temporal_mode == "frame_shuffle" else frames_per_patch
        orders.extend([p * unit + k for p in perm.tolist() for k in range(unit)] for perm in perms)
    shuffled = counterfactual_logps(model, rollout, perturbed, drop_visual=False, chunk_size=a.chunk_size)
    scores = counterfactual_scores(real_logps, shuffled, a.score)
    is_image = torch.tensor([k == "image" for k in rollout.kinds], device=scores.device)
    return scores.masked_fill(is_image.repeat_interleave(rollout.group_size)[:, None], math.nan)


def require_video_prompts(model, samples: list[Sample], data: str) -> None:
    """Stop at the data's first image prompt when the model encodes images apart from videos (LLaVA-OneVision
    tiles them "anyres" by a tower path of their own): the rollout passes make one tower call per pass,
    which keeps ZeRO-3 ranks in step, and a batch mixing images and videos would need two."""
    if visual_layout(model).image_grids:
        return
    image = next((s for s in samples if s.data_type == "image"), None)
    if image is not None:
        raise ValueError(f"train_ktr.py: {data}: record {image.problem_id!r} ({image.path}) is an image prompt, "
                         f"but {type(model).__name__} encodes images apart from videos (visual_layout(model)."
                         'image_grids is False: images are tiled "anyres" by a tower path of their own, so a batch '
                         "mixing them with videos needs two tower calls); this family trains on video prompts only: "
                         "leave the image records out of the data")


def check_replicas_agree(accelerator, policy, out: Path) -> None:
    """Data-parallel replicas must hold identical weights; record each rank's parameter checksum
    (under ZeRO-3 every rank holds only a shard, so there is nothing to compare)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return
    checksum = torch.tensor([sum(p.detach().double().sum().item() for p in policy.parameters())],
                            device=accelerator.device)
    checksums = accelerator.gather(checksum).tolist()
    if accelerator.is_main_process:
        write_json(out / "replicas.json", {"param_checksums": checksums, "agree": len(set(checksums)) == 1})
        if len(set(checksums)) != 1:
            print(f"WARNING: replicas disagree: parameter checksums {checksums}")


def gather_mean(accelerator, metrics: dict) -> dict:
    """Average the numeric metrics over processes (each process saw its own prompts)."""
    if accelerator.num_processes == 1:
        return metrics
    keys = [k for k, v in metrics.items() if isinstance(v, float | int) and k != "step"]
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return {**metrics, **dict(zip(keys, values.tolist(), strict=True))}


def token_rows(tokenizer, batch, rollout: Rollout, completions, reward_parts, scores, masks, step,
               advantages: torch.Tensor | None = None) -> list[dict]:
    """One row per completion (text only): its tokens and, per signal, the scores and whether it was selected."""
    rows = []
    for n in range(rollout.completion_ids.shape[0]):
        length = int(rollout.completion_mask[n].sum())
        ids = rollout.completion_ids[n, :length].tolist()
        sample = batch[n // rollout.group_size]
        rows.append({
            "step": step, "problem_id": sample.problem_id, "question": sample.problem,
            "question_family": sample.question_family, "solution": sample.solution, "options": sample.options,
            "completion": completions[n], "reward": {k: float(v[n]) for k, v in reward_parts.items()},
            "advantage": None if advantages is None else round(float(advantages[n]), 4),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "selected": {k: "".join("1" if x else "0" for x in m[n, :length].tolist()) for k, m in masks.items()},
            "scores": {k: [None if not math.isfinite(x) else round(x, 4) for x in s[n, :length].tolist()]
                       for k, s in scores.items()},
        })
    return rows


def page_groups(records: list[dict], media: dict, rows: list[dict], groups: list[Group], kinds: list[str],
                orders: list, cfg: Config) -> tuple[list[dict], dict]:
    """The attribution page keeps whole groups (the advantage is relative to the group): the last
    ceil(html_samples / G) prompts' rows, and their frames, made into thumbnails once per prompt."""
    g = cfg.num_generations
    keep = math.ceil(cfg.html_samples / g)
    if keep == 0:
        return [], {}
    order_note = {"shuffle": "patches shuffled", "reverse": "patches reversed", "segment_shuffle": "segments shuffled",
                  "frame_shuffle": "frames shuffled"}[cfg.attribution.temporal_mode]
    video = itertools.count()  # orders lists the batch's videos in prompt order
    for b, (group, kind) in enumerate(zip(groups, kinds, strict=True)):
        order = orders[next(video)] if kind == "video" and orders else None
        if b >= len(groups) - keep:
            media[prompt_key(rows[b * g])] = prompt_media(group.visual, order, order_note)
    records = (records + rows)[-keep * g:]
    kept = {prompt_key(r) for r in records}
    return records, {k: v for k, v in media.items() if k in kept}


if __name__ == "__main__":
    main()
