"""Train a Frame-Voyager scorer on combinations ranked by label_frames.py.

    python train_voyager.py --config configs/voyager.yaml labels=FILE model=PATH output_dir=DIR
    accelerate launch train_voyager.py --config configs/voyager.yaml ...   # features + gradients sharded

1. Features: the frozen backbone (vision tower + bottom `layers` language layers of `model`) reads each
   labeled sample's M candidate frames and its question once; the features stay in memory, so epochs
   cost only the small heads (common/voyager.py).
2. Training: per sample, `combos_per_sample` of its labeled combinations; a combination's score is the
   mean reward of its frames (with `coverage`, + a weight the question gives times how evenly the frames
   spread); pairwise ranking loss -log sigmoid(s_better - s_worse) over pairs whose label losses differ by
   more than `margin`. A step runs its whole batch as one padded forward of the heads.
3. Validation (a held-out share of the labeled samples): pairwise ranking accuracy (all pairs, and the half
   with the larger loss gaps: above the median gap of the validation pairs), Spearman correlation
   between scores and -loss, and where the data has evidence frames, how often the top-T frames hit
   them (next to uniform T frames and the label model's own best combination).

Writes DIR/voyager.safetensors (heads only), DIR/voyager.json (spec incl. backbone path, layers and
fingerprint), DIR/metrics.jsonl, DIR/summary.json, DIR/config.yaml.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from common.config import parse_config, require, save_config
from common.frames import require_pixel_budget
from common.jsonl import append_jsonl, read_jsonl, write_json
from common.launch import configure_deepspeed, make_accelerator
from common.models import apply_pixel_budget, load_model, load_processor, model_path_ok, video_max_pixels
from common.report import TRACKERS, start_trackers, tracker_scalars
from common.video import VideoError, read_frames, uniform_indices
from common.voyager import (
    VoyagerHeads,
    VoyagerSpec,
    backbone_features,
    backbone_fingerprint,
    batched_ranking_loss,
    combination_scores,
    pad_batch,
    ranking_loss,
    save_voyager,
    select_frames,
    voyager_query,
)


@dataclass
class Config:
    labels: str = "outputs/tiny/labels/labels.jsonl"
    model: str = ""  # backbone; empty = the label model named in the labels
    output_dir: str = "outputs/tiny/voyager"
    layers: int = 1  # N: bottom language layers on top of the vision tower (0 = vision tower only)
    dim: int = 128  # head projection size
    token_pool: Literal["mean", "max"] = "mean"  # a frame's reward: mean or best similarity of its tokens
    # Not in the paper: a query-conditioned weight on how evenly a combination spreads over the video, added to
    # its mean reward, and selection by the sum (common/voyager.py, VoyagerHeads)
    coverage: bool = False
    combos_per_sample: int = 64  # labeled combinations drawn per sample per step; 0 = all
    margin: float = 0.0  # only pairs whose label losses differ by more than this
    epochs: int = 20
    batch_size: int = 32  # samples per step (per process)
    lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.1
    max_pixels: int = 0  # per-frame pixel cap of the backbone's processor; 0 = the one the labels were made at
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # backbone dtype
    log_every: int = 20
    trackers: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb] (offline); x axis = epoch
    seed: int = 0

    def validate(self) -> None:
        require(Path(self.labels).is_file(), "labels", f"no such file: {self.labels}")
        require(not self.model or model_path_ok(self.model), "model", f"no such path: {self.model}")
        require(self.layers >= 0, "layers", f"must be >= 0, got {self.layers}")
        for key in ("dim", "epochs", "batch_size", "log_every"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.combos_per_sample >= 0, "combos_per_sample", "must be >= 0")
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require_pixel_budget(self.max_pixels, "max_pixels")
        require(set(self.trackers) <= set(TRACKERS), "trackers", f"each must be one of {TRACKERS}, got {self.trackers}")


@dataclass
class Item:
    """One labeled sample with its cached backbone features."""

    frames: torch.Tensor  # M x P x H
    query: torch.Tensor  # Lq x H
    combinations: torch.Tensor  # K x T positions into the candidates
    losses: torch.Tensor  # K label losses (lower = better)
    candidate_indices: list[int]
    total_frames: int
    evidence: set[int] | None


def extract(model, processor, rows: list[dict], layers: int, desc: str, show: bool) -> tuple[list[Item], list[str]]:
    items, skipped = [], []
    for row in tqdm(rows, desc=desc, unit="sample", disable=not show):
        try:
            clip = read_frames(row["path"], indices=row["candidate_indices"])
        except VideoError as e:
            skipped.append(f"{row['problem_id']}: {e}")
            continue
        frames, query = backbone_features(model, processor, clip, voyager_query(row["problem"], row["options"]), layers)
        evidence = row.get("evidence_frames")
        items.append(Item(frames.cpu(), query.cpu(), torch.tensor(row["combinations"]), torch.tensor(row["losses"]),
                          row["candidate_indices"], row["total_frames"], None if evidence is None else set(evidence)))
    return items, skipped


def batch_loss(heads, batch: list[Item], rng: random.Random, combos_per_sample: int, margin: float,
               device) -> torch.Tensor:
    """The mean over `batch` of each sample's ranking loss on `combos_per_sample` of its labeled combinations
    (drawn with `rng`), all samples in one forward (padded). `per_sample_loss` is the same, one at a time."""
    picks = [torch.tensor(rng.sample(range(len(it.losses)), min(len(it.losses), combos_per_sample or len(it.losses))))
             for it in batch]
    frames, frame_mask = pad_batch([it.frames for it in batch])
    query, query_mask = pad_batch([it.query for it in batch])
    combos, valid = pad_batch([it.combinations[p] for it, p in zip(batch, picks, strict=True)])
    losses, _ = pad_batch([it.losses[p, None] for it, p in zip(batch, picks, strict=True)])
    rewards, coverage = heads(frames.to(device), query.to(device), frame_mask.to(device), query_mask.to(device))
    return batched_ranking_loss(rewards.cpu(), combos, losses[..., 0], valid, margin,
                                None if coverage is None else coverage.cpu(), frame_mask.any(-1).sum(-1))


def per_sample_loss(heads, batch: list[Item], rng: random.Random, combos_per_sample: int, margin: float,
                    device) -> torch.Tensor:
    """`batch_loss` the straightforward way: a forward and a ranking loss per sample (the reference in tests)."""
    loss = 0.0
    for it in batch:
        rewards, coverage = heads(it.frames.to(device), it.query.to(device))
        k = len(it.losses)
        pick = torch.tensor(rng.sample(range(k), min(k, combos_per_sample or k)))
        scores = combination_scores(rewards.cpu(), it.combinations[pick], None if coverage is None else coverage.cpu())
        loss = loss + ranking_loss(scores, it.losses[pick], margin) / len(batch)
    return loss


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by position, fine for continuous scores)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denom if denom > 0 else 0.0


def median_gap(rows: list[dict], margin: float) -> float:
    """The median loss gap of the ranked pairs (losses differing by more than `margin`) in `rows`: pairs above it
    are the half with the larger gaps, where the labels are least likely to be noise."""
    gaps = []
    for row in rows:
        losses = torch.tensor(row["losses"], dtype=torch.float64)
        gap = losses[None, :] - losses[:, None]
        gaps.append(gap[gap > margin])
    gaps = torch.cat(gaps) if gaps else torch.zeros(0)
    return gaps.median().item() if len(gaps) else 0.0


@torch.no_grad()
def validate(heads, items: list[Item], margin: float, num_frames: int, device,
             large_gap: float = math.inf, sizes: Sequence[int] = ()) -> dict[str, float]:
    """Sums over `items` (so shards can be added up): ranking accuracy (the pairs whose loss gap exceeds `margin`,
    and those whose gap exceeds `large_gap`), Spearman, evidence hits; with two or more candidate counts in
    `sizes` (labels from `mixed_candidates`; every process passes the same), the pairs of each M apart too."""
    sums = dict.fromkeys(["pairs", "correct", "pairs_large_gap", "correct_large_gap", "spearman", "samples",
                          "with_evidence", "hit_voyager", "hit_uniform", "hit_label_best"], 0.0)
    per_m = sorted(set(sizes)) if len(set(sizes)) > 1 else []  # one M: the overall accuracy is that M's
    sums |= {f"{key}_m{m}": 0.0 for m in per_m for key in ("pairs", "correct")}
    for it in items:
        rewards, coverage = heads(it.frames.to(device), it.query.to(device))
        rewards, coverage = rewards.cpu(), None if coverage is None else coverage.cpu()
        scores = combination_scores(rewards, it.combinations, coverage)
        gap = it.losses[None, :] - it.losses[:, None]  # gap[i, j] > 0: combination i has the lower loss
        better, large = gap > margin, gap > large_gap
        diff = scores[:, None] - scores[None, :]
        right = (diff > 0).float() + 0.5 * (diff == 0).float()
        sums["pairs"] += better.sum().item()
        sums["correct"] += right[better].sum().item()
        if per_m:
            m = len(it.candidate_indices)
            sums[f"pairs_m{m}"] += better.sum().item()
            sums[f"correct_m{m}"] += right[better].sum().item()
        sums["pairs_large_gap"] += large.sum().item()
        sums["correct_large_gap"] += right[large].sum().item()
        sums["spearman"] += spearman(scores, -it.losses)
        sums["samples"] += 1
        if it.evidence is not None:
            top = [it.candidate_indices[p] for p in select_frames(rewards, num_frames, coverage)]
            best = [it.candidate_indices[p] for p in it.combinations[it.losses.argmin()].tolist()]
            sums["with_evidence"] += 1
            sums["hit_voyager"] += bool(set(top) & it.evidence)
            sums["hit_uniform"] += bool(set(uniform_indices(it.total_frames, num_frames)) & it.evidence)
            sums["hit_label_best"] += bool(set(best) & it.evidence)
    return sums


def summarize(sums: dict[str, float]) -> dict[str, float]:
    if not sums["samples"]:
        return {}
    out = {"pair_accuracy": sums["correct"] / max(1, sums["pairs"])}
    if sums["pairs_large_gap"]:
        out["pair_accuracy_large_gap"] = sums["correct_large_gap"] / sums["pairs_large_gap"]
    out["spearman"] = sums["spearman"] / max(1, sums["samples"])
    for key in sums:
        if key.startswith("pairs_m") and sums[key]:
            m = key.removeprefix("pairs_")  # "m16"
            out[f"pair_accuracy_{m}"] = sums[f"correct_{m}"] / sums[key]
    if sums["with_evidence"]:
        for key in ("voyager", "uniform", "label_best"):
            out[f"evidence_recall_{key}"] = sums[f"hit_{key}"] / sums["with_evidence"]
    return out


def main() -> None:
    cfg = parse_config(Config)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(log_with=cfg.trackers or None, project_dir=str(out))
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, out)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    start_trackers(accelerator, cfg, "train_voyager", out)

    rows = [r for r in read_jsonl(cfg.labels) if len(r["losses"]) >= 2]
    if not rows:
        raise SystemExit(f"{cfg.labels}: no labeled samples with at least 2 combinations")
    backbone = cfg.model or rows[0]["label_model"]
    num_frames = len(rows[0]["combinations"][0])
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_val = round(len(rows) * cfg.val_fraction)
    val_rows, train_rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    # pair_accuracy_large_gap: the validation pairs above the median gap of all of them, whatever the margin
    large_gap = median_gap(val_rows, 0.0)
    sizes = sorted({len(r["candidate_indices"]) for r in val_rows})  # M of the validation samples, the same everywhere

    if len(train_rows) < world:
        raise SystemExit(f"{len(train_rows)} training samples for {world} processes")

    # Features, each process for its round-robin shard.
    model = load_model(backbone, cfg.dtype, device=accelerator.device).eval()
    # Features at the labels' resolution unless told otherwise (older labels carry no budget: saved default).
    # A processor that already works at that budget is left as it is (LLaVA-OneVision's fixed frame size).
    processor = load_processor(backbone)
    budget = cfg.max_pixels or rows[0].get("max_pixels", 0)
    if budget and budget != video_max_pixels(processor):
        apply_pixel_budget(processor, budget)
    show = accelerator.is_local_main_process
    start = time.time()
    train, skipped = extract(model, processor, train_rows[rank::world], cfg.layers, "features (train)", show)
    val, skipped_val = extract(model, processor, val_rows[rank::world], cfg.layers, "features (val)", show)
    feature_seconds = time.time() - start
    if not train:
        raise SystemExit(f"{cfg.labels}: none of the {len(train_rows[rank::world])} training samples of process {rank} "
                         f"could be read, e.g. {'; '.join(skipped[:2])}")
    skipped = [s for part in gather_object([skipped + skipped_val]) for s in part]
    fingerprint = backbone_fingerprint(model)
    label_sizes = [len(r["candidate_indices"]) for r in rows]  # M of every label row (mixed_candidates: several)
    candidate_sizes = sorted(set(label_sizes))
    spec = VoyagerSpec(backbone=backbone, layers=cfg.layers, hidden_size=fingerprint["hidden_size"], dim=cfg.dim,
                       token_pool=cfg.token_pool, fingerprint=fingerprint,
                       candidates=max(candidate_sizes, key=label_sizes.count),  # a tie: the smaller
                       candidate_sizes=candidate_sizes, num_frames=num_frames,
                       max_pixels=video_max_pixels(processor), coverage=cfg.coverage)
    del model

    heads = VoyagerHeads(spec.hidden_size, cfg.dim, cfg.token_pool, cfg.coverage)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    configure_deepspeed(accelerator, cfg.batch_size, 0.0)
    heads, optimizer = accelerator.prepare(heads, optimizer)
    # Every process takes the same number of steps (DDP all-reduces each one); a shorter shard wraps around.
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / world) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    rng = random.Random(cfg.seed * 1000 + rank)

    def epoch_metrics(epoch: int, train_loss: float | None) -> dict:
        sums = validate(accelerator.unwrap_model(heads).eval(), val, cfg.margin, num_frames, accelerator.device,
                        large_gap, sizes)
        totals = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "sum")
        row = {"epoch": epoch, "train_loss": train_loss, **summarize(dict(zip(sums, totals.tolist(), strict=True)))}
        if accelerator.is_main_process:
            append_jsonl(out / "metrics.jsonl", [row])
            if cfg.trackers:
                accelerator.log(tracker_scalars(row), step=epoch)
        return row

    bar = tqdm(total=total_steps, desc="train voyager", unit="step", disable=not show)
    step, row = 0, epoch_metrics(0, None)  # the untrained heads, for reference
    for epoch in range(1, cfg.epochs + 1):
        heads.train()
        shard = train[:]
        rng.shuffle(shard)
        shard = shard * math.ceil(steps_per_epoch * cfg.batch_size / max(1, len(shard)))
        losses = []
        for i in range(steps_per_epoch):
            batch = shard[i * cfg.batch_size: (i + 1) * cfg.batch_size]
            loss = batch_loss(heads, batch, rng, cfg.combos_per_sample, cfg.margin, accelerator.device)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}")
        row = epoch_metrics(epoch, sum(losses) / len(losses))
        if show:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    bar.close()

    if accelerator.is_main_process:
        save_voyager(out, accelerator.unwrap_model(heads), spec)
        write_json(out / "summary.json", {"labels": cfg.labels, "backbone": backbone, "train_samples": len(train_rows),
                                          "val_samples": len(val_rows), "skipped": skipped,
                                          "median_val_gap": large_gap,
                                          "feature_seconds": round(feature_seconds, 2), "final": row,
                                          "spec": asdict(spec), "time": time.strftime("%F %T")})
        print(f"voyager -> {out}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    accelerator.end_training()


if __name__ == "__main__":
    main()
