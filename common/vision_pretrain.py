"""Pretrain a tiny model's vision tower on rendered TinyWorld frames: the stand-in for the pretrained
encoder that every real Video-LLM ships with.

A built tiny model's tower is random. Frozen, it keeps the pixels apart but hardly separates a shape from
its colour or a brief flash from its neighbours, and trained end to end by SFT it collapses (README, "Can
the tiny model learn to see?"). So the tiny default's answers were limited by perception, not by what SFT
or RL could teach (README, "What limits the gain"). A real checkpoint's tower was pretrained on images
before the language model ever saw it; this does the same for the tiny one, on scenes rendered here
from a seed no data split uses (never the training or test videos).

The task, per visual token (what the language model reads): for each of the palette's colours, is it in
the token's region, and as which shape (absent / square / circle / triangle)? The targets are read off
the processor's own pixels: merged token k is rows k*m^2 .. (k+1)*m^2 - 1 of `pixel_values_videos` (m the
merge size), which is how the merger groups them, so the targets follow the processor's layout whatever
it is. A linear head on the tower's output learns them with cross-entropy; the head is then dropped. The
tower's last linear layer is rescaled so that its tokens keep the random tower's mean norm (a linear
map: the same information at the scale the language model's recipe was tuned on).

Grid-based towers only (Qwen2-VL / Qwen2.5-VL / Qwen3-VL); a LLaVA-style tower is refused.

    python -m common.vision_pretrain --model outputs/tiny/model --out outputs/tiny/tower --steps 2500
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import tinyworld
from common.models import encode_visual, load_model, load_processor
from common.video import uniform_indices

SCENE_SEED = 7919  # TinyWorld scenes of this seed + --seed; the data splits use seeds 0 (train/test) and 1 (val)
MIN_PIXELS = 4  # a colour is in a token's region when at least this many of its pixels are
TOLERANCE = 30  # per channel, after the processor's resize (hard-edged shapes keep their colour inside)


def token_targets(pixel_rows: torch.Tensor, merge: int, temporal_patch: int, patch: int, mean, std,
                  scene: tinyworld.Scene) -> torch.Tensor:
    """(tokens, colours) targets of one video: 0 when the colour is not in the token's pixels, else 1 + the
    index of the shape of that colour in the scene (TinyWorld gives each object of a scene its own colour)."""
    rows = pixel_rows.view(-1, merge * merge, 3, temporal_patch, patch, patch).float()  # (tokens, m^2, C, T, p, p)
    rgb = (rows * torch.tensor(std).view(3, 1, 1, 1) + torch.tensor(mean).view(3, 1, 1, 1)) * 255
    rgb = rgb.movedim(2, -1).reshape(rows.shape[0], -1, 3)  # (tokens, pixels, 3)
    palette = torch.tensor(list(tinyworld.COLORS.values()), dtype=torch.float32)  # (colours, 3)
    shapes = {o.color: tinyworld.SHAPES.index(o.shape) for o in scene.objects}
    targets = torch.zeros(rows.shape[0], len(palette), dtype=torch.long)
    for c, name in enumerate(tinyworld.COLORS):
        if name in shapes:
            present = ((rgb - palette[c]).abs() <= TOLERANCE).all(dim=-1).sum(dim=-1) >= MIN_PIXELS
            targets[present, c] = 1 + shapes[name]
    return targets


def render_clips(processor, n: int, seed: int, frames: int = 64, size: int = 112, num: int = 8) -> list[dict]:
    """`n` rendered scenes of seed SCENE_SEED + seed, `num` frames each (even items: uniform frames; odd:
    a random sorted draw, so the tower also sees the uneven spacings frame selection gives), as processor
    inputs with their per-token targets."""
    vp = processor.video_processor
    merge, patch, tp = vp.merge_size, vp.patch_size, vp.temporal_patch_size
    rng = np.random.default_rng(seed)
    clips = []
    for i in tqdm(range(n), desc="render", unit="scene"):
        scene = tinyworld.make_scene(SCENE_SEED + seed, "train", i, frames, size)
        video = tinyworld.render(scene, frames, size)
        if i % 2:
            idx = sorted(rng.choice(frames, num, replace=False).tolist())
        else:
            idx = uniform_indices(frames, num)
        meta = {"fps": 8.0, "total_num_frames": frames, "frames_indices": idx}
        batch = vp(videos=[video[idx]], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
        pixels = batch["pixel_values_videos"]
        clips.append({"pixels": pixels, "grid": batch["video_grid_thw"],
                      "targets": token_targets(pixels, merge, tp, patch, vp.image_mean, vp.image_std, scene)})
    return clips


def tower_tokens(model, clips: list[dict]) -> torch.Tensor:
    """(videos, tokens, hidden): the tower's output for each clip (the features the language model reads)."""
    feats = encode_visual(model, torch.cat([c["pixels"] for c in clips]), torch.cat([c["grid"] for c in clips]))
    return torch.stack([f[:, 0] for f in feats])


def scores(head, tokens: torch.Tensor, targets: torch.Tensor, train_targets: torch.Tensor) -> dict:
    """Held-out scores: the cross-entropy (and that of predicting each colour's training frequencies of
    absent / square / circle / triangle alone, which a tower that sees nothing would reach), the accuracy of
    (token, colour) presence, and of the shape where the colour is present."""
    logits = head(tokens).unflatten(-1, (targets.shape[-1], -1))
    pred = logits.argmax(-1)
    present = targets > 0
    freq = torch.stack([torch.bincount(train_targets[..., c].flatten(), minlength=logits.shape[-1])
                        for c in range(targets.shape[-1])]).float() + 1  # (colours, classes), add-one smoothed
    prior = (freq / freq.sum(-1, keepdim=True)).log()
    return {"held_out_loss": torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten()).item(),
            "base_rate_loss": -prior.gather(1, targets.flatten(0, -2).T).mean().item(),
            "presence_accuracy": ((pred > 0) == present).float().mean().item(),
            "presence_recall": ((pred > 0) & present).sum().item() / max(1, present.sum().item()),
            "shape_accuracy": (pred[present] == targets[present]).float().mean().item()}


def pretrain(model_dir: str | Path, out_dir: str | Path, steps: int = 2500, scenes: int = 6000, held_out: int = 0,
             batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> dict:
    """Pretrain `model_dir`'s vision tower (see the module docstring) and save the whole model to `out_dir`;
    `held_out` scenes (0: a fifth, at most 256) score it."""
    torch.manual_seed(seed)
    model, processor = load_model(model_dir), load_processor(model_dir)
    if not hasattr(processor.video_processor, "merge_size") or "visual" not in dict(model.model.named_children()):
        raise ValueError(f"{model_dir}: vision pretraining needs a grid-based video tower (Qwen-VL); "
                         f"this model's processor is {type(processor.video_processor).__name__}")
    held_out = held_out or min(256, scenes // 5)  # scenes kept out of training, to score the tower on
    if not 0 < held_out < scenes - 1:
        raise ValueError(f"--scenes {scenes}: too few to keep {held_out} out and train on the rest")
    start = time.time()
    clips = render_clips(processor, scenes, seed)
    val, train = clips[:held_out], clips[held_out:]
    tower = model.model.visual
    with torch.no_grad():
        norm0 = tower_tokens(model, val).norm(dim=-1).mean().item()
    colours = train[0]["targets"].shape[-1]
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, colours * (1 + len(tinyworld.SHAPES)))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = np.random.default_rng(seed)
    tower.train()
    bar = tqdm(range(steps), desc="vision pretrain", unit="step")
    for _ in bar:
        batch = [train[i] for i in generator.choice(len(train), min(batch_size, len(train)), replace=False)]
        logits = head(tower_tokens(model, batch))
        targets = torch.stack([c["targets"] for c in batch])
        loss = torch.nn.functional.cross_entropy(logits.unflatten(-1, (colours, -1)).flatten(0, -2), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    tower.eval()
    with torch.no_grad():
        tokens = tower_tokens(model, val)
        result = {"steps": steps, "scenes": scenes, "seed": seed, "final_loss": loss.item(),
                  **scores(head, tokens, torch.stack([c["targets"] for c in val]),
                           torch.stack([c["targets"] for c in train]))}
        # a linear rescale of the output: the random tower's mean token norm, the same information
        scale = norm0 / tokens.norm(dim=-1).mean().item()
        last = [m for m in tower.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
        result.update(token_norm=tower_tokens(model, val[:64]).norm(dim=-1).mean().item(), random_token_norm=norm0,
                      seconds=round(time.time() - start))
    out = Path(out_dir)
    model.save_pretrained(out)
    for f in Path(model_dir).iterdir():  # tokenizer, processor, chat template: as built
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    (out / "vision_pretrain.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.vision_pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a built tiny model (python -m common.models build-tiny)")
    ap.add_argument("--out", required=True, help="where the model with the pretrained tower goes")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--scenes", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = pretrain(a.model, a.out, a.steps, a.scenes, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    print(f"vision tower pretrained ({r['steps']} steps, {r['seconds']} s): held-out loss {r['held_out_loss']:.4f} "
          f"(colour frequencies alone {r['base_rate_loss']:.4f}), presence accuracy "
          f"{r['presence_accuracy']:.3f}, recall {r['presence_recall']:.3f}, shape accuracy {r['shape_accuracy']:.3f} "
          f"-> {a.out}")


if __name__ == "__main__":
    main()
