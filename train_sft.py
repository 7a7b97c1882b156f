"""Supervised warm start: teach a Video-LLM to answer `<think>reasoning</think><answer>X</answer>`.

    python train_sft.py --config configs/tiny/sft.yaml
    accelerate launch --config_file configs/accelerate/zero2.yaml train_sft.py --config configs/sft.yaml

The loss is on the assistant tokens only. Writes DIR/metrics.jsonl, periodic checkpoints
DIR/checkpoints/step_NNNNNN (model + processor + optimizer/scheduler/RNG state + data position)
and DIR/final (model + processor, loadable by eval.py). `resume=true` continues from the latest
checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common.checkpoint import latest_checkpoint, load_progress, save_checkpoint
from common.config import parse_config, require, save_config
from common.data import build_prompt, build_target, epoch_batches, load_samples, require_some_media
from common.frames import FramesConfig, load_batch, make_selector
from common.jsonl import append_jsonl, drop_steps_after
from common.launch import configure_deepspeed, make_accelerator
from common.models import load_model, load_processor, model_inputs, model_path_ok
from common.report import TRACKERS, start_trackers, tracker_scalars


@dataclass
class Config:
    model: str = "outputs/tiny/model"
    data: str = "outputs/tiny/data/train.json"
    media_root: str = ""
    output_dir: str = "outputs/tiny/sft"
    frames: FramesConfig = field(default_factory=FramesConfig)
    with_reasoning: bool = True  # target = <think>process</think><answer>X</answer>; false = answer only
    epochs: int = 1
    max_steps: int = 0  # optimizer steps (the schedule's length); 0 = run the epochs
    stop_after: int = 0  # exit with a resumable checkpoint after this many steps; 0 = never
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    freeze_vision: bool = False  # freeze the vision encoder (Qwen-VL: blocks + merger; LLaVA: tower, not projector)
    vision_lr: float = 0.0  # peak lr of the vision encoder when it trains; 0 = lr (one group)
    attn_implementation: str = ""
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2
    log_every: int = 10
    on_bad_video: str = "skip"  # skip (record in skipped.jsonl and go on) or stop
    trackers: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb] (offline), next to metrics.jsonl
    resume: bool = True
    seed: int = 0

    def validate(self) -> None:
        require(model_path_ok(self.model), "model", f"no such path: {self.model}")
        require(Path(self.data).is_file(), "data", f"no such file: {self.data}")
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.vision_lr >= 0, "vision_lr", f"must be >= 0 (0 = lr), got {self.vision_lr}")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.on_bad_video in ("skip", "stop"), "on_bad_video", "must be skip or stop")
        require(set(self.trackers) <= set(TRACKERS), "trackers", f"each must be one of {TRACKERS}, got {self.trackers}")
        self.frames.validate()


def param_groups(model, vision_lr: float = 0.0) -> list[dict]:
    """The trainable parameters as optimizer groups: one group, or (vision_lr > 0) the vision encoder's
    own group at vision_lr and the rest at the optimizer's lr. The schedule scales both alike."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not vision_lr:
        return [{"params": trainable}]
    vision = {id(p) for p in model.get_encoder("video").parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in vision]},
              {"params": [p for p in trainable if id(p) in vision], "lr": vision_lr}]
    return [g for g in groups if g["params"]]  # frozen vision: no group of its own


def supervised_labels(input_ids: torch.Tensor, target_lengths: list[int]) -> torch.Tensor:
    """Labels with everything but the last `target_lengths[i]` tokens of each row masked (-100).
    Rows are left-padded, so the assistant answer (ending with EOS) is at the end of every row."""
    labels = torch.full_like(input_ids, -100)
    for row, n in enumerate(target_lengths):
        labels[row, -n:] = input_ids[row, -n:]
    return labels


def main() -> None:
    cfg = parse_config(Config)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                   mixed_precision="bf16" if cfg.bf16 else "no", log_with=cfg.trackers or None,
                                   project_dir=str(out))
    torch.manual_seed(cfg.seed)
    samples = load_samples(cfg.data, cfg.media_root or None)
    require_some_media(samples, cfg.data)
    select = make_selector(cfg.frames)
    if accelerator.is_main_process:
        save_config(cfg, out)
    start_trackers(accelerator, cfg, "train_sft", out)

    resume_from = latest_checkpoint(out) if cfg.resume else None
    model = load_model(resume_from or cfg.model, attn_implementation=cfg.attn_implementation or None)
    processor = load_processor(cfg.model, cfg.frames)
    tokenizer = processor.tokenizer
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if cfg.freeze_vision:
        model.get_encoder("video").requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.vision_lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(len(samples), cfg.batch_size, accelerator.num_processes, 0, cfg.seed, 0))
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch / cfg.grad_accum)
    require(steps_per_epoch > 0, "batch_size", f"{len(samples)} samples are fewer than one global batch")
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, micro = 0, 0  # optimizer steps done, micro-batches consumed
    if resume_from is not None:
        progress = load_progress(accelerator, resume_from)
        step, micro = progress["step"], progress["micro"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:  # rows a killed run logged after its last checkpoint are logged again
        drop_steps_after(out / "metrics.jsonl", step)

    skipped_path = out / "skipped.jsonl"
    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", disable=not accelerator.is_main_process)
    model.train()
    window, t_window = [], time.time()
    total_micro = total_steps * cfg.grad_accum
    while step < total_steps and micro < total_micro:
        epoch, in_epoch = divmod(micro, steps_per_epoch)
        batches = epoch_batches(len(samples), cfg.batch_size, accelerator.num_processes,
                                accelerator.process_index, cfg.seed, epoch)
        if hasattr(select, "set_epoch"):  # frames.strategy=random / segment: new draws each epoch
            select.set_epoch(epoch)
        for indices in batches[in_epoch:]:
            if micro >= total_micro:
                break
            batch, visuals = load_batch([samples[i] for i in indices], select, cfg.on_bad_video, skipped_path,
                                        step=step)
            with accelerator.accumulate(model):
                if batch:
                    targets = [build_target(s, cfg.with_reasoning) for s in batch]
                    inputs = model_inputs(processor, [build_prompt(s) for s in batch], visuals, targets)
                    inputs = inputs.to(accelerator.device)
                    eos = tokenizer.eos_token or ""
                    lengths = [len(tokenizer(t + eos, add_special_tokens=False)["input_ids"]) for t in targets]
                    labels = supervised_labels(inputs["input_ids"], lengths)
                    loss = model(**inputs, labels=labels).loss
                else:  # every video of this micro-batch was unreadable: keep the processes in step
                    loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            window.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = {"step": step, "epoch": micro / steps_per_epoch, "loss": float(np.mean(window)),
                           "lr": scheduler.get_last_lr()[0],
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "seconds_per_step": (time.time() - t_window) / max(1, len(window) // cfg.grad_accum)}
                if accelerator.is_main_process:
                    append_jsonl(out / "metrics.jsonl", [metrics])
                    if cfg.trackers:
                        accelerator.log(tracker_scalars(metrics), step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                window, t_window = [], time.time()
            stopping = cfg.stop_after and cfg.stop_after <= step < total_steps
            if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or stopping:
                save_checkpoint(accelerator, model, processor, out / "checkpoints" / f"step_{step:06d}",
                                progress={"step": step, "micro": micro}, keep=cfg.keep_checkpoints)
            if stopping:
                accelerator.print(f"stopped after step {step} (stop_after); rerun to resume")
                return
            if step >= total_steps:
                break
    bar.close()
    save_checkpoint(accelerator, model, processor, out / "final")
    accelerator.print(f"final model -> {out / 'final'}; metrics -> {out / 'metrics.jsonl'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
