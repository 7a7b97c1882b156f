"""Frame-Voyager: a light, query-conditioned frame scorer on a frozen Video-LLM backbone.

The backbone is a Video-LLM's vision tower plus its bottom N language layers, run once over
[all M candidate frames + the query text]. Each candidate goes in as its own temporal patch (the
frame twice, [f, f]): Qwen2.5-VL otherwise fuses two consecutive frames into one patch and the
features of a patch could not be credited to either frame (LLaVA-OneVision encodes every frame alone:
each goes in once). The frame's visual tokens (h*w/4 of them; LLaVA's pooled patches, not the newline
after the video) and the query tokens (the text after the video) are read at layer N; two small trainable heads
project them, a frame's reward is the mean (or best) scaled dot product of its tokens with the mean
projected query, and a combination's score is the mean reward of its frames. Trained with a
pairwise ranking loss on combinations labeled by label_frames.py (train_voyager.py); used by eval.py
through `frames.strategy=voyager`: score M candidates in one pass, keep the top T in temporal order.

The scorer's own [f, f] layout only concerns the scorer; the chosen frames are handed to the
answering model as a normal clip.

Also here: `select_top`, and the retrieval baseline (`frames.strategy=retrieval`: text-frame cosine
similarity with a CLIP/SigLIP model, or with the answering model's own embeddings), whose embeddings the
training-free AKS and DPP selectors in common/selectors.py reuse.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.models import (
    add_deepstack,
    apply_pixel_budget,
    chat_text,
    embed_visual,
    encode_visual,
    load_model,
    load_processor,
    position_ids,
    video_format,
    video_max_pixels,
    visual_layout,
    visual_tokens,
)
from common.video import Clip, probe, read_frames

CONFIG_NAME, WEIGHTS_NAME = "voyager.json", "voyager.safetensors"


# ---------------------------------------------------------------------------------------------
# Small pieces every strategy shares
# ---------------------------------------------------------------------------------------------

def subclip(clip: Clip, positions: Sequence[int]) -> Clip:
    """The frames at `positions` of `clip`, keeping their frame numbers in the source video."""
    positions = [int(p) for p in positions]
    return Clip(frames=clip.frames[positions], indices=[clip.indices[p] for p in positions],
                timestamps=[clip.timestamps[p] for p in positions], fps=clip.fps, total_frames=clip.total_frames)


def select_top(frame_scores: Sequence[float] | torch.Tensor, num: int) -> list[int]:
    """Positions of the `num` best-scored frames, in temporal (ascending) order; ties go to the earlier frame."""
    scores = torch.as_tensor(frame_scores, dtype=torch.float64).flatten()
    if not 0 < num <= len(scores):
        raise ValueError(f"cannot pick {num} of {len(scores)} frames")
    order = torch.argsort(-scores, stable=True)
    return sorted(order[:num].tolist())


def select_frames(rewards: torch.Tensor, num: int, coverage: float | torch.Tensor | None = None) -> list[int]:
    """The `num` frames a scorer picks: the top `num` rewards, or with a coverage weight w the combination of
    highest mean reward + w * evenness, found exactly by dynamic programming over the frames in temporal order
    (the squared gaps are a chain: O(num * M^2)). Positions in temporal order."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten().cpu()
    w = 0.0 if coverage is None else float(coverage)
    m = len(r)
    if w == 0.0 or num == m:
        return select_top(r, num)
    if not 0 < num <= m:
        raise ValueError(f"cannot pick {num} of {m} frames")
    c = w * (num + 1) / m ** 2  # mean reward + w * evenness = sum(r) / num - c * sum(gap^2) + w
    pos = torch.arange(m, dtype=torch.float64)
    gap2 = (pos[None, :] - pos[:, None]) ** 2  # [i, j]: from frame i to frame j
    best = r / num - c * (pos + 0.5) ** 2  # one frame chosen, ending at j
    later = torch.ones(m, m, dtype=torch.bool).triu(1)  # [i, j]: j comes after i
    back = []  # per added frame: for each end j, the frame before it
    for _ in range(num - 1):
        value, arg = (best[:, None] - c * gap2).masked_fill(~later, -torch.inf).max(0)
        best = r / num + value
        back.append(arg)
    last = int(torch.argmax(best - c * (m - 0.5 - pos) ** 2))
    chosen = [last]
    for arg in reversed(back):
        chosen.append(int(arg[chosen[-1]]))
    return sorted(chosen)


def read_candidates(path: str | Path, candidates: int, num: int) -> Clip:
    """M uniform candidate frames, all distinct: a video shorter than M gives all its frames. One with
    no more than T frames gives what uniform sampling of T gives (nothing left to choose)."""
    total, _ = probe(path)
    if total <= num:
        return read_frames(path, num_frames=num)
    return read_frames(path, num_frames=min(candidates, total))


def voyager_query(problem: str, options: Sequence[str] = ()) -> str:
    """The text a scorer reads: the question and its options (the answer format instructions carry no
    information about which frames matter)."""
    return "\n".join([problem.strip(), *(o.strip() for o in options)])


def pick_frames(sample, candidates: int, num: int, choose: Callable[[Clip, str], Sequence[int]]) -> Clip:
    """The frames at `choose(clip, query)`'s positions among `candidates` uniform frames (the frame selectors'
    shared step; a video with no more than `num` frames is returned whole)."""
    clip = read_candidates(sample.path, candidates, num)
    if len(clip.indices) == num:
        return clip
    return subclip(clip, choose(clip, voyager_query(sample.problem, sample.options)))


def pick_top_frames(sample, candidates: int, num: int, score: Callable[[Clip, str], torch.Tensor]) -> Clip:
    """The `num` best of `candidates` uniform frames by `score(clip, query)`, in temporal order."""
    return pick_frames(sample, candidates, num, lambda clip, query: select_top(score(clip, query).cpu(), num))


# ---------------------------------------------------------------------------------------------
# Backbone features
# ---------------------------------------------------------------------------------------------

def own_patch_inputs(processor, clip: Clip, text: str):
    """Processor inputs for `clip` with every frame as its own temporal patch (each frame repeated
    temporal_patch_size times; once where the tower encodes every frame alone); fps metadata = the real
    frame numbers, so RoPE time stays true."""
    tp = video_format(processor).frames_per_patch
    frames = np.ascontiguousarray(np.repeat(clip.frames, tp, axis=0))
    meta = {"fps": float(clip.fps), "total_num_frames": int(clip.total_frames),
            "frames_indices": [int(i) for i in clip.indices for _ in range(tp)]}
    return processor(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                     padding=True, return_tensors="pt")


def bottom_layers(model, embeds: torch.Tensor, positions: torch.Tensor, layers: int,
                  deepstack: dict | None = None) -> torch.Tensor:
    """Hidden states after the first `layers` decoder layers (one unpadded sequence per row), as the next
    layer would receive them (with the DeepStack levels of `deepstack`, from `embed_visual`, added after
    the layers they belong to), without running the rest of the model."""
    from transformers.masking_utils import create_causal_mask

    lm = model.model.language_model
    if not 0 <= layers <= len(lm.layers):
        raise ValueError(f"layers={layers} but the backbone has {len(lm.layers)} language layers")
    mask = create_causal_mask(config=lm.config, inputs_embeds=embeds, attention_mask=None, cache=None)
    position_embeddings = lm.rotary_emb(embeds, positions)
    hidden = embeds
    for index, layer in enumerate(lm.layers[:layers]):
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
        hidden = add_deepstack(hidden, index, deepstack or {})
    return hidden


@torch.no_grad()
def backbone_features(model, processor, clip: Clip, query: str, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame features M x P x H, query features Lq x H) at layer `layers` of the frozen backbone.

    P = visual tokens per frame. Query tokens = every token after the video (the question, options and
    the chat template's closing tokens; not a closing <|vision_end|>), which see the whole video through
    causal attention. Features at the video's end that no frame produced (LLaVA's newline) are in neither.
    """
    inputs = own_patch_inputs(processor, clip, chat_text(processor, query)).to(model.device)
    ids = inputs["input_ids"]
    video_mask = ids == model.config.video_token_id
    visual = torch.cat(encode_visual(model, inputs["pixel_values_videos"], inputs.get("video_grid_thw")))
    embeds, deepstack = embed_visual(model.get_input_embeddings()(ids), video_mask, visual)
    hidden = bottom_layers(model, embeds, position_ids(model, inputs), layers, deepstack)[0].float()
    video_pos = video_mask[0].nonzero().squeeze(1)
    query_start = int(video_pos[-1]) + 1
    if ids[0, query_start] == visual_tokens(model.config).vision_end:
        query_start += 1
    frame_pos = video_pos[: len(video_pos) - visual_layout(model).video_end_tokens]
    frames = hidden[frame_pos].view(len(clip.indices), -1, hidden.shape[-1])
    return frames, hidden[query_start:]


def backbone_fingerprint(model) -> dict:
    """What must match for trained heads to make sense on a backbone: the sizes, and a hash of the input
    embeddings (they change with any fine-tuning). The hash is taken over the weights rounded to
    bfloat16, so a float32 and a bfloat16 load of the same checkpoint give the same fingerprint."""
    text = model.config.get_text_config()
    weight = model.get_input_embeddings().weight.detach().to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(weight.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {"hidden_size": int(text.hidden_size), "num_hidden_layers": int(text.num_hidden_layers),
            "vocab_size": int(weight.shape[0]), "embedding_sha256": digest}


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """A message naming what differs, or None when `actual` is the backbone the heads were trained on."""
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if expected[key] != actual[key]:
            return f"{key} is {actual[key]}, the heads were trained on {expected[key]}"
    if expected["embedding_sha256"] != actual["embedding_sha256"]:
        return "same sizes but different weights (input-embedding hash differs)"
    return None


# ---------------------------------------------------------------------------------------------
# The trainable part
# ---------------------------------------------------------------------------------------------

@dataclass
class VoyagerSpec:
    """Everything voyager.json records: the heads' shape and the backbone they sit on."""

    backbone: str  # path of the Video-LLM whose vision tower + bottom layers give the features
    layers: int  # N: language layers run on top of the vision tower
    hidden_size: int
    dim: int = 128  # projection size of the heads
    token_pool: str = "mean"  # how a frame's tokens become one reward: "max" or "mean"
    fingerprint: dict | None = None  # backbone_fingerprint() of the backbone at training time
    candidates: int = 16  # M of the training labels, the most common one if they mix M (any M works at test time)
    candidate_sizes: list[int] = field(default_factory=list)  # every M in the training labels; [] = older files
    num_frames: int = 4  # T of the training combinations
    max_pixels: int = 0  # per-frame pixel cap the features were computed at; 0 = unknown (older files)
    coverage: bool = False  # a query-conditioned weight on how evenly a combination spreads (VoyagerHeads)


class VoyagerHeads(nn.Module):
    """Frame head and query head (LayerNorm -> Linear -> GELU -> Linear each) and the reward.

    With `coverage` (not in the paper; `train_voyager.py coverage=true`), a linear head on the projected query
    also gives a weight w: a combination's score becomes its mean reward + w * evenness (how evenly its frames
    spread over the video, `evenness`), and selection picks the T frames that maximise that (`select_frames`).
    A sum of per-frame rewards cannot say "spread the frames out"; a question that counts objects by how much of
    the video shows them needs it, and one that needs the first and last frames may want the opposite (w < 0).
    The head starts at w = 0, the paper's scorer.
    """

    def __init__(self, hidden_size: int, dim: int, token_pool: str = "mean", coverage: bool = False):
        super().__init__()
        if token_pool not in ("max", "mean"):
            raise ValueError(f"token_pool must be 'max' or 'mean', got {token_pool!r}")
        self.token_pool, self.dim = token_pool, dim

        def head() -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim), nn.GELU(),
                                 nn.Linear(dim, dim))

        self.frame_head, self.query_head = head(), head()
        self.coverage_head = None
        if coverage:
            self.coverage_head = nn.Linear(dim, 1)
            nn.init.zeros_(self.coverage_head.weight)
            nn.init.zeros_(self.coverage_head.bias)

    def forward(self, frames: torch.Tensor, query: torch.Tensor, frame_mask: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sample: frame features (M, P, H) and query features (Lq, H) -> rewards (M,) and the coverage
        weight (a scalar; None without `coverage`).

        B samples padded to a common size (`pad_batch`), with the masks: frames (B, M, P, H), frame_mask (B, M, P)
        true on real tokens, query (B, Lq, H), query_mask (B, Lq) -> rewards (B, M) (0 for a padded frame) and
        weights (B,): per sample the same numbers as one at a time, up to float rounding."""
        if frame_mask is None:
            q = self.query_head(query).mean(0)
            sim = self.frame_head(frames) @ q / self.dim ** 0.5  # (M, P)
            rewards = sim.amax(-1) if self.token_pool == "max" else sim.mean(-1)
        else:
            qm = query_mask.unsqueeze(-1).to(query.dtype)
            q = (self.query_head(query) * qm).sum(1) / qm.sum(1).clamp(min=1)  # (B, dim)
            sim = torch.einsum("bmpd,bd->bmp", self.frame_head(frames), q) / self.dim ** 0.5
            if self.token_pool == "max":
                rewards = sim.masked_fill(~frame_mask, -torch.inf).amax(-1)
            else:
                fm = frame_mask.to(sim.dtype)
                rewards = (sim * fm).sum(-1) / fm.sum(-1).clamp(min=1)
            rewards = torch.where(frame_mask.any(-1), rewards, torch.zeros_like(rewards))
        return rewards, None if self.coverage_head is None else self.coverage_head(q).squeeze(-1)


def pad_batch(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors that differ in their leading dims (same trailing one) into a zero-padded batch, and the
    mask of real entries: e.g. frames (M_i, P_i, H) -> (B, max M, max P, H) and (B, max M, max P)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim() - 1)]
    out = tensors[0].new_zeros(len(tensors), *shape, tensors[0].shape[-1])
    mask = torch.zeros(len(tensors), *shape, dtype=torch.bool, device=out.device)
    for i, t in enumerate(tensors):
        index = (i, *(slice(0, n) for n in t.shape[:-1]))
        out[index], mask[index] = t, True
    return out, mask


def evenness(combinations: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
    """How evenly each combination's T frames spread over M uniform candidates: 1 - (T + 1) * sum of its squared
    gaps as fractions of the video (the T + 1 gaps between the chosen frames and the video's two ends, candidate
    p standing at p + 0.5 of M). 0 when every gap is equal, the two ends included (so uniform sampling, which
    leaves half gaps at the ends, scores a little below 0); down to about 1 - (T + 1) (M - T)^2 / M^2 when the
    frames bunch at one end. combinations (..., T) positions; m an int or a tensor broadcastable to (...)."""
    c = combinations.sort(-1).values.to(torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64, device=c.device)[..., None].expand(*c.shape[:-1], 1)
    pos = torch.cat([torch.full_like(m, -0.5), c, m - 0.5], -1)
    u = pos.diff(dim=-1) / m
    return 1 - (c.shape[-1] + 1) * (u ** 2).sum(-1)


def combination_scores(rewards: torch.Tensor, combinations: torch.Tensor,
                       coverage: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each combination = mean reward of its frames (+ coverage weight * evenness with `coverage`);
    rewards (M,), combinations (K, T) -> (K,)."""
    scores = rewards[combinations].mean(-1)
    if coverage is None:
        return scores
    return scores + coverage * evenness(combinations, len(rewards)).to(scores.dtype)


def ranking_loss(scores: torch.Tensor, losses: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(s_better - s_worse) over pairs whose label losses differ by more than `margin`
    (lower label loss = better). Zero (with a gradient path) when no pair qualifies."""
    better = (losses[:, None] + margin) < losses[None, :]  # [i, j]: i is better than j
    if not better.any():
        return scores.sum() * 0.0
    diff = scores[:, None] - scores[None, :]
    return F.softplus(-diff[better]).mean()


def batched_ranking_loss(rewards: torch.Tensor, combinations: torch.Tensor, losses: torch.Tensor,
                         valid: torch.Tensor, margin: float = 0.0, coverage: torch.Tensor | None = None,
                         candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over B samples of `ranking_loss(combination_scores(...))`, in one pass: rewards (B, M),
    combinations (B, K, T) and their label losses (B, K) padded to the largest K, valid (B, K) true on real
    combinations; with `coverage` (B,), also each sample's number of real candidates (B,). A sample without a
    qualifying pair adds 0, as `ranking_loss` gives it."""
    scores = torch.gather(rewards, 1, combinations.flatten(1)).view(combinations.shape).mean(-1)  # (B, K)
    if coverage is not None:
        scores = scores + coverage[:, None] * evenness(combinations, candidates[:, None]).to(scores.dtype)
    pair = valid[:, :, None] & valid[:, None, :]
    better = ((losses[:, :, None] + margin) < losses[:, None, :]) & pair  # [b, i, j]: i is better than j
    diff = scores[:, :, None] - scores[:, None, :]
    per_sample = torch.where(better, F.softplus(-diff), 0.0).sum((1, 2)) / better.sum((1, 2)).clamp(min=1)
    return per_sample.mean()


def save_voyager(directory: str | Path, heads: VoyagerHeads, spec: VoyagerSpec) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_voyager(directory: str | Path, backbone=None) -> tuple[VoyagerHeads, VoyagerSpec]:
    """Heads and spec from DIR; with `backbone` (a loaded model), check it is the one trained on."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} + {WEIGHTS_NAME} (train one with train_voyager.py)")
    spec = VoyagerSpec(**json.loads((directory / CONFIG_NAME).read_text()))
    if backbone is not None:
        check_backbone(spec, backbone)
    heads = VoyagerHeads(spec.hidden_size, spec.dim, spec.token_pool, spec.coverage)
    heads.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return heads.eval(), spec


def check_backbone(spec: VoyagerSpec, model) -> None:
    problem = fingerprint_mismatch(spec.fingerprint, backbone_fingerprint(model)) if spec.fingerprint else None
    if problem is None and spec.layers > backbone_fingerprint(model)["num_hidden_layers"]:
        problem = f"needs {spec.layers} language layers"
    if problem:
        raise ValueError(f"Voyager heads were trained on backbone {spec.backbone!r}; this model differs: {problem}")


# ---------------------------------------------------------------------------------------------
# Selectors for eval.py (common.frames.make_selector builds them)
# ---------------------------------------------------------------------------------------------

class VoyagerSelector:
    """Reads M uniform candidates, scores them in one backbone pass, returns T of them in temporal order: the
    top T (the paper), or, set-aware (frames.voyager_select), AKS's judge-and-split on the scores or a DPP that
    trades them against the frames' similarity (common.selectors).

    The backbone is the answering model itself when it is the one the heads were trained on (no second
    copy in memory); otherwise it is loaded from the path in voyager.json (plug-and-play: any answering
    model can use a Voyager trained on another backbone).
    """

    def __init__(self, directory: str, candidates: int, num: int, model=None, processor=None, select: str = "top",
                 aks_threshold: float = 0.5, coverage_scale: float = 1.0):
        if select not in ("top", "aks", "dpp"):
            raise ValueError(f"unknown Voyager selection {select!r} (top, aks, dpp)")
        self.select, self.aks_threshold, self.coverage_scale = select, aks_threshold, coverage_scale
        spec = VoyagerSpec(**json.loads((Path(directory) / CONFIG_NAME).read_text()))
        same = model is not None and spec.fingerprint is not None and \
            fingerprint_mismatch(spec.fingerprint, backbone_fingerprint(model)) is None
        if same:
            self.model, self.processor = model, processor
        else:
            backbone = spec.backbone
            if not Path(backbone).is_dir() and (backbone.startswith((".", "/")) or backbone.count("/") != 1):
                raise FileNotFoundError(
                    f"{Path(directory) / CONFIG_NAME}: 'backbone' {backbone!r} is not a folder (a relative path is "
                    f"read from the working directory, {Path.cwd()}). The answering model is not the one these heads "
                    "were trained on, so the scorer needs its own backbone: run from where train_voyager.py ran, or "
                    "set 'backbone' to the model's path")
            self.model = load_model(backbone, device=None if model is None else model.device).eval()
            self.processor = load_processor(backbone)
        if spec.max_pixels and video_max_pixels(self.processor) != spec.max_pixels:
            # The heads learned features at the training resolution; the answering model's budget may differ.
            self.processor = copy.deepcopy(self.processor)
            apply_pixel_budget(self.processor, spec.max_pixels)
        self.heads, self.spec = load_voyager(directory, backbone=self.model)
        self.heads.to(self.model.device)
        self.candidates, self.num = candidates, num

    @torch.no_grad()
    def features_and_rewards(self, clip: Clip, query: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(frame features M x P x H, frame rewards M, coverage weight or None): one backbone pass."""
        frames, q = backbone_features(self.model, self.processor, clip, query, self.spec.layers)
        return frames, *self.heads(frames, q)

    def frame_rewards(self, clip: Clip, query: str) -> torch.Tensor:
        return self.features_and_rewards(clip, query)[1]

    def choose(self, clip: Clip, query: str) -> list[int]:
        """Positions of the T frames: the top T of the rewards (with a coverage head, the best mean reward +
        weight * evenness), AKS's judge-and-split on them, or a DPP with the rewards as quality and the cosine
        similarity of the frames' backbone features (mean over their tokens); those two bring their own notion of
        coverage and leave the coverage weight aside."""
        frames, rewards, coverage = self.features_and_rewards(clip, query)
        rewards = rewards.cpu()
        if self.select == "top":
            return select_frames(rewards, self.num, None if coverage is None else coverage * self.coverage_scale)
        from common.selectors import aks_select, dpp_select  # common.selectors imports this module

        if self.select == "aks":
            return aks_select(rewards, self.num, threshold=self.aks_threshold)
        unit = F.normalize(frames.mean(1).double(), dim=-1)
        return dpp_select(rewards, (unit @ unit.T).cpu(), self.num)

    def __call__(self, sample) -> Clip:
        return pick_frames(sample, self.candidates, self.num, self.choose)


class RetrievalSelector:
    """Text-frame similarity: cosine between each candidate frame and the question, top T kept.

    With `retrieval_model` (a CLIP/SigLIP checkpoint path): its image and text embeddings. Without:
    the answering model's own embeddings, i.e. each frame's vision-tower output (already projected to
    the LLM's input space by the merger) mean-pooled over its tokens, against the mean input embedding
    of the question's tokens.
    """

    def __init__(self, candidates: int, num: int, model=None, processor=None, retrieval_model: str = ""):
        self.candidates, self.num = candidates, num
        if retrieval_model:
            from transformers import AutoModel, AutoProcessor

            self.model = AutoModel.from_pretrained(retrieval_model).eval()
            self.processor = AutoProcessor.from_pretrained(retrieval_model)
            self.own = False
        else:
            if model is None or processor is None:
                raise ValueError("retrieval without frames.retrieval_model needs the answering model")
            self.model, self.processor, self.own = model, processor, True

    @torch.no_grad()
    def embeddings(self, clip: Clip, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame embeddings M x D, query embedding 1 x D)."""
        device = self.model.device
        if self.own:  # every frame its own temporal patch, as for the Voyager backbone
            tp = video_format(self.processor).frames_per_patch
            frames = np.ascontiguousarray(np.repeat(clip.frames, tp, axis=0))
            pixels = self.processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
            grids = pixels.get("video_grid_thw")
            visual = encode_visual(self.model, pixels["pixel_values_videos"].to(device),
                                   None if grids is None else grids.to(device))[0][:, 0]
            visual = visual[: len(visual) - visual_layout(self.model).video_end_tokens]
            image = visual.view(len(clip.indices), -1, visual.shape[-1]).mean(1)
            ids = self.processor.tokenizer(query, return_tensors="pt")["input_ids"].to(device)
            text = self.model.get_input_embeddings()(ids)[0].mean(0, keepdim=True)
        else:
            image = _features(self.model.get_image_features(
                **self.processor(images=list(clip.frames), return_tensors="pt").to(device)))
            max_length = self.model.config.get_text_config().max_position_embeddings  # CLIP: 77 tokens
            text_inputs = self.processor(text=[query], return_tensors="pt", padding=True, truncation=True,
                                         max_length=max_length).to(device)
            text = _features(self.model.get_text_features(**text_inputs))
        return image, text

    def frame_scores(self, clip: Clip, query: str) -> torch.Tensor:
        """Cosine similarity of each candidate frame with the query (M,)."""
        image, text = self.embeddings(clip, query)
        return F.cosine_similarity(image.float(), text.float(), dim=-1)

    def __call__(self, sample) -> Clip:
        return pick_top_frames(sample, self.candidates, self.num, self.frame_scores)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
