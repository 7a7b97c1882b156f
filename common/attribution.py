"""Token log-probs under the real and counterfactual inputs that Video-KTR's attribution needs,
computed cheaply, plus the straightforward computation they must equal.

A rollout is B prompts x G sampled completions, laid out as one (N = B*G, P + Lc) batch:
prompts left-padded to P, completions right-padded to Lc (what `generate` returns).

What makes it cheap (each gives the same numbers as the straightforward way; tests check it):
- the vision tower runs once per video per step: `visual_features` encodes each prompt's video
  once; the G copies of a prompt share those features (`embed_inputs`), and the frame-shuffled
  counterfactual permutes whole temporal patches of the cached features, which equals re-encoding
  shuffled frame pairs (the tower attends within a patch only); a model's DeepStack features
  (Qwen3-VL: vision features added into the first language layers at the visual positions) are
  cached, repeated and permuted with the main ones, and timestamp text tokens stay where they are;
- the visual-removed counterfactual drops the visual tokens from the sequence and keeps every
  other token's position, which equals masking them from attention, and needs no pixels (their
  DeepStack injections go with them);
- the G completions of a prompt share its prefix: the no-grad passes run the B prompts once and
  reuse their KV cache for the G completions each;
- log-probs come from hidden states in chunks (`token_logps_and_entropy`), never as a
  (N x L x vocabulary) float32 tensor.
Supported: the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: grids, 3-D M-RoPE positions, videos and
images in one tower call) and, for video prompts, LLaVA-OneVision (no grids: videos as one (videos, frames,
C, H, W) tensor, every frame encoded alone, one newline feature after each video, 1-D positions numbered as
`generate` numbers them). Its images are tiled "anyres" by a tower path of their own; `require_supported`
names that property when one reaches these passes.

Under ZeRO-3 every call of a sharded module is a collective, so every rank must make the same
sequence of calls whatever its batch holds. Each pass here makes a fixed number of calls: one
vision-tower call for all the batch's videos and images together, one language-model call for the
prompts and one for the completions, and ceil(Lc / chunk_size) output-layer calls, where the
completion length Lc is padded to the same value on every rank (`build_rollout(pad_to=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.grpo import token_logps_and_entropy
from common.models import embed_visual, encode_visual, visual_layout, visual_tokens

TEMPORAL_MODES = ("shuffle", "reverse", "segment_shuffle", "frame_shuffle")
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class Rollout:
    """Prompt + completion ids of N = B*G sequences and what a forward needs to run over them."""

    input_ids: torch.Tensor  # (N, P + Lc)
    attention_mask: torch.Tensor  # (N, P + Lc)
    position_ids: torch.Tensor  # (3, N, P + Lc) M-RoPE or (N, P + Lc) 1-D, computed once with the full mask
    completion_mask: torch.Tensor  # (N, Lc) bool: tokens up to and including the first EOS
    prompt_length: int  # P
    group_size: int  # G
    visual_inputs: dict  # pixel_values(_videos), *_grid_thw, second_per_grid_ts of the B prompts
    kinds: list[str]  # per prompt: "video" or "image"
    temperature: float = 1.0  # the sampling temperature: log-probs are those of logits / temperature

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    def repeated_visual_inputs(self) -> dict:
        """The B prompts' visual inputs repeated for all N rows, as a plain forward over N rows
        needs them (pixels included: this is what re-encodes the video G times)."""
        out = {k: v.repeat_interleave(self.group_size, dim=0) if k.endswith(("thw", "grid_ts")) else v
               for k, v in self.visual_inputs.items()}
        for key, grid_key in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
            if key in out and grid_key in out:
                blocks = torch.split(self.visual_inputs[key], self.visual_inputs[grid_key].prod(dim=1).tolist())
                out[key] = torch.cat([blk for blk in blocks for _ in range(self.group_size)], dim=0)
            elif key in out:  # no grids (LLaVA-OneVision): one (frames, C, H, W) entry per video
                out[key] = out[key].repeat_interleave(self.group_size, dim=0)
        return out


def completion_mask_from(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """Valid tokens: everything up to and including the first EOS (a completion cut at the length
    limit has no EOS and is valid to its end)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos


def require_supported(model, prompt_inputs: dict) -> None:
    """Raise, naming the property, for inputs these passes do not handle: images of a model that encodes
    them apart from videos (LLaVA-OneVision tiles them "anyres" through `get_image_features`), since a batch
    mixing them would need two tower calls and ZeRO-3 ranks must all make the same calls."""
    if "pixel_values" in prompt_inputs and not visual_layout(model).image_grids:
        raise ValueError(f"train_ktr.py (rollout log-probs and attribution) takes video prompts only for "
                         f"{type(model).__name__}: visual_layout(model).image_grids is False (its images are tiled "
                         '"anyres" by a tower path of their own, so images and videos need two tower calls)')


def build_rollout(model, prompt_inputs: dict, completion_ids: torch.Tensor, group_size: int,
                  eos_token_ids: list[int], temperature: float = 1.0, pad_to: int | None = None,
                  pad_token_id: int = 0) -> Rollout:
    """Lay out B processed prompts (left-padded) and their B*G completions (right-padded).

    `pad_to` right-pads the completions to that length with invalid `pad_token_id` tokens (e.g. the
    longest completion over all ranks, so that every rank runs the same number of chunks)."""
    require_supported(model, prompt_inputs)
    repeat = lambda t: t.repeat_interleave(group_size, dim=0)  # noqa: E731
    completion_mask = completion_mask_from(completion_ids, eos_token_ids)
    extra = (pad_to or 0) - completion_ids.shape[1]
    if extra > 0:
        completion_ids = F.pad(completion_ids, (0, extra), value=pad_token_id)
        completion_mask = F.pad(completion_mask, (0, extra), value=False)
    input_ids = torch.cat([repeat(prompt_inputs["input_ids"]), completion_ids], dim=1)
    attention_mask = torch.cat([repeat(prompt_inputs["attention_mask"]), completion_mask.long()], dim=1)
    visual = {k: v for k, v in prompt_inputs.items() if k in VISUAL_KEYS}
    if visual_layout(model).mrope:
        token_types = torch.cat([repeat(prompt_inputs["mm_token_type_ids"]), torch.zeros_like(
            completion_ids, dtype=prompt_inputs["mm_token_type_ids"].dtype)], 1)
        grids = {k: repeat(v) for k, v in visual.items() if k in ("image_grid_thw", "video_grid_thw",
                                                                   "second_per_grid_ts")}
        position_ids, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=token_types,
                                                     attention_mask=attention_mask, **grids)
        model.model.rope_deltas = None
    else:  # 1-D, as `generate` numbers a left-padded prompt and what it sampled: from 0 at the first real token
        sampled = torch.cat([repeat(prompt_inputs["attention_mask"]), torch.ones_like(completion_ids)], dim=1)
        position_ids = (sampled.cumsum(dim=1) - 1).clamp(min=0)
    video_token = visual_tokens(model.config).video
    kinds = ["video" if (row == video_token).any() else "image" for row in prompt_inputs["input_ids"]]
    return Rollout(input_ids, attention_mask, position_ids, completion_mask,
                   prompt_inputs["input_ids"].shape[1], group_size, visual, kinds, temperature)


# ------------------------------------------------------------------------------------------------
# Visual features: encoded once per prompt, shared by its G completions.
# ------------------------------------------------------------------------------------------------

@dataclass
class VisualFeatures:
    video: list[torch.Tensor]  # per video, (tokens, 1 + DeepStack levels, hidden), temporal patches contiguous
    image: list[torch.Tensor]  # per image, the same layout
    video_grids: torch.Tensor | None  # (B_video, 3) t, h, w in patches; None for a model without grids
    video_patches: list[int] = field(default_factory=list)  # per video, its temporal patches (LLaVA: frames)
    video_end_tokens: int = 0  # features after each video's patches that belong to none (LLaVA's newline)


def visual_features(model, visual_inputs: dict) -> VisualFeatures:
    """Run the vision tower once over the batch's videos and images together: one call whatever
    the mix (an image is a one-patch video to the tower), so ranks with different mixes stay in step.
    Without grids (LLaVA-OneVision, video prompts only) the videos are one (videos, frames, C, H, W) tensor."""
    video_grids, image_grids = visual_inputs.get("video_grid_thw"), visual_inputs.get("image_grid_thw")
    pixels = [x for x in (visual_inputs.get("pixel_values_videos"), visual_inputs.get("pixel_values")) if x is not None]
    if not pixels:
        return VisualFeatures([], [], None)
    if video_grids is None and image_grids is None:
        videos = visual_inputs["pixel_values_videos"]
        return VisualFeatures(encode_visual(model, videos, None), [], None, [videos.shape[1]] * len(videos),
                              visual_layout(model).video_end_tokens)
    grids = torch.cat([g for g in (video_grids, image_grids) if g is not None])
    out = encode_visual(model, torch.cat(pixels), grids)
    n_video = 0 if video_grids is None else len(video_grids)
    return VisualFeatures(out[:n_video], out[n_video:], video_grids,
                          [] if video_grids is None else video_grids[:, 0].tolist())


def embed_inputs(model, input_ids: torch.Tensor, features: VisualFeatures, rows_per_prompt: int
                 ) -> tuple[torch.Tensor, dict]:
    """Token embeddings with each prompt's visual features scattered into its placeholders,
    repeated for the prompt's `rows_per_prompt` rows (the features are not recomputed), and the
    language model's DeepStack arguments for them ({} for a model without DeepStack)."""
    ids = visual_tokens(model.config)
    embeds = model.get_input_embeddings()(input_ids)
    is_visual = torch.isin(input_ids, torch.tensor([ids.image, ids.video], device=input_ids.device))
    visual = None  # (visual positions in row-major order, 1 + levels, hidden)
    for token, feats in ((ids.image, features.image), (ids.video, features.video)):
        if not feats:
            continue
        rows = torch.cat([f for f in feats for _ in range(rows_per_prompt)], dim=0)
        if visual is None:
            visual = rows.new_zeros(int(is_visual.sum()), *rows.shape[1:])
        visual[(input_ids == token)[is_visual]] = rows
    if visual is None:
        return embeds, {}
    return embed_visual(embeds, is_visual, visual)


def permute_temporal_patches(features: VisualFeatures, permutations: list[torch.Tensor | None]) -> VisualFeatures:
    """Reorder whole temporal patches of each video's features (None keeps a video as it is); the features
    after the patches that belong to none (LLaVA's newline) stay at the end."""
    if not features.video:  # no video in the batch (images only): nothing to reorder
        return features
    out = []
    for feats, t, perm in zip(features.video, features.video_patches, permutations, strict=True):
        n = len(feats) - features.video_end_tokens
        if perm is None:
            out.append(feats)
        else:
            out.append(torch.cat([feats[:n].view(t, -1, *feats.shape[1:])[perm].reshape(n, *feats.shape[1:]),
                                  feats[n:]]))
    return dataclasses.replace(features, video=out)


def temporal_permutation(n_patches: int, mode: str, generator: torch.Generator, segments: int = 4) -> torch.Tensor:
    """The perturbed order of a video's temporal patches (or of its single frames, for
    "frame_shuffle"): a random shuffle (never the identity when avoidable), the reverse order, or
    a shuffle of `segments` contiguous segments."""
    if mode not in TEMPORAL_MODES:
        raise ValueError(f"temporal perturbation {mode!r} is not one of {TEMPORAL_MODES}")
    identity = torch.arange(n_patches)
    if mode == "reverse" or n_patches < 2:
        return identity.flip(0)
    if mode in ("shuffle", "frame_shuffle"):
        for _ in range(10):
            perm = torch.randperm(n_patches, generator=generator)
            if not torch.equal(perm, identity):
                return perm
        return identity.flip(0)
    bounds = torch.linspace(0, n_patches, min(segments, n_patches) + 1).round().long().tolist()
    pieces = [identity[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    order = temporal_permutation(len(pieces), "shuffle", generator)
    return torch.cat([pieces[i] for i in order.tolist()])


def shuffle_frames(model, visual_inputs: dict, permutations: list[torch.Tensor | None]) -> dict:
    """The visual inputs with each video's single frames reordered (`permutations[i]` orders video i's
    frames; None = unchanged), as if the frames had been shuffled before the processor."""
    videos = visual_inputs.get("pixel_values_videos")
    if videos is None or not permutations:
        return visual_inputs
    if "video_grid_thw" not in visual_inputs:  # (videos, frames, C, H, W)
        shuffled = torch.stack([v if p is None else v[p] for v, p in zip(videos, permutations, strict=True)])
    else:
        vision = model.config.vision_config
        shuffled = permute_frame_pixels(videos, visual_inputs["video_grid_thw"], permutations,
                                        vision.temporal_patch_size, vision.patch_size)
    return {**visual_inputs, "pixel_values_videos": shuffled}


def permute_frame_pixels(pixels: torch.Tensor, grids: torch.Tensor, permutations: list[torch.Tensor | None],
                         temporal_patch_size: int, patch_size: int) -> torch.Tensor:
    """Reorder single frames in the processor's flat video pixel layout, as if the frames had been
    shuffled before the processor (the frame_shuffle counterfactual; the video must be re-encoded).

    Each video is t blocks of h*w rows; a row holds one patch as (channels, temporal_patch_size,
    patch_size, patch_size), so frame k of temporal patch j is slice k of block j's rows.
    `permutations[i]` orders the t * temporal_patch_size frames of video i (None = unchanged)."""
    out = []
    for block, grid, perm in zip(torch.split(pixels, grids.prod(dim=1).tolist()), grids.tolist(), permutations,
                                 strict=True):
        if perm is None:
            out.append(block)
            continue
        t, hw = grid[0], grid[1] * grid[2]
        tp, area = temporal_patch_size, patch_size * patch_size
        frames = block.reshape(t, hw, -1, tp, area).permute(0, 3, 1, 2, 4).reshape(t * tp, hw, -1, area)
        frames = frames[perm].reshape(t, tp, hw, -1, area).permute(0, 2, 3, 1, 4)
        out.append(frames.reshape_as(block))
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------------
# Log-probs of the completion tokens.
# ------------------------------------------------------------------------------------------------

def policy_logps(model, rollout: Rollout, features: VisualFeatures, chunk_size: int = 64,
                 with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion-token log-probs (differentiable) and entropies under the real input, one
    forward over all N rows with the shared visual features."""
    embeds, deepstack = embed_inputs(model, rollout.input_ids, features, rollout.group_size)
    hidden = model.model.language_model(inputs_embeds=embeds, position_ids=rollout.position_ids,
                                        attention_mask=rollout.attention_mask, **deepstack).last_hidden_state
    p = rollout.prompt_length
    return token_logps_and_entropy(hidden[:, p - 1: -1], model.get_output_embeddings(), rollout.completion_ids,
                                   chunk_size, with_entropy=with_entropy, temperature=rollout.temperature)


@torch.no_grad()
def counterfactual_logps(model, rollout: Rollout, features: VisualFeatures | None, drop_visual: bool,
                         chunk_size: int = 64) -> torch.Tensor:
    """Completion log-probs (N, Lc) under a counterfactual input: `drop_visual` removes the visual
    tokens (positions of the rest preserved); otherwise `features` (e.g. temporally permuted; the
    real ones give the real log-probs by the same computation) fill the visual placeholders.
    No gradient; `prefix_shared_logps` is the computation."""
    return prefix_shared_logps(model, rollout, features, drop_visual, chunk_size, with_entropy=False)[0]


def prefix_shared_logps(model, rollout: Rollout, features: VisualFeatures | None, drop_visual: bool = False,
                        chunk_size: int = 64, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion log-probs (N, Lc) and entropies, with each of the B prompts run once: their KV cache is
    repeated G times (differentiably: the G completions' gradients add up in the prompt), and then all N
    completions run together. Equal to `policy_logps` up to float rounding (tests), with the prompt's work
    cut G-fold. The prompts are left-aligned after any removal (`drop_visual`), so each ends at the last
    column. Also under (non-reentrant) gradient checkpointing: the two passes use caches that a layer's replay
    in the backward runs through again with the same result (`_kv_layers`)."""
    ids = visual_tokens(model.config)
    placeholders = torch.tensor([ids.video, ids.image], device=rollout.input_ids.device)
    p, g = rollout.prompt_length, rollout.group_size
    first = torch.arange(0, rollout.input_ids.shape[0], g, device=rollout.input_ids.device)
    prompt_ids = rollout.input_ids[first, :p]
    keep = rollout.attention_mask[first, :p].bool()
    if drop_visual:
        keep &= ~torch.isin(prompt_ids, placeholders)
    # Kept tokens moved to the right end of each row, in order; the rows' leftover columns are masked.
    width = int(keep.sum(dim=1).max())
    take = torch.argsort(keep.int(), dim=1, stable=True)[:, p - width:]
    prefix_mask = keep.gather(1, take)
    prefix_ids = prompt_ids.gather(1, take)
    positions = rollout.position_ids[..., first, :p]
    prefix_positions = positions.gather(-1, take.expand(*positions.shape[:-2], *take.shape))
    if drop_visual:
        prefix_embeds, deepstack = model.get_input_embeddings()(prefix_ids), {}
    else:
        prefix_embeds, deepstack = embed_inputs(model, prefix_ids, features, rows_per_prompt=1)

    lm = model.model.language_model
    prompt_kv = _prompt_cache()
    with _checkpointed_layers_keep_cache(lm):
        prefix = lm(inputs_embeds=prefix_embeds, position_ids=prefix_positions, attention_mask=prefix_mask.long(),
                    cache=prompt_kv, use_cache=False, **deepstack)
        if prefix.last_hidden_state.requires_grad and not prompt_kv.layers[-1].keys.requires_grad:
            raise RuntimeError("prefix sharing: the prompts' keys carry no gradient (reentrant gradient "
                               "checkpointing runs layers without autograd); use use_reentrant=False")
        completion_ids = rollout.completion_ids
        mask = torch.cat([prefix_mask.long().repeat_interleave(g, dim=0), torch.ones_like(completion_ids)], dim=1)
        rest = lm(inputs_embeds=model.get_input_embeddings()(completion_ids),
                  position_ids=rollout.position_ids[..., p:], attention_mask=mask,
                  cache=_repeated_read_only(prompt_kv, g), use_cache=False)
    hidden = torch.cat([prefix.last_hidden_state[:, -1:].repeat_interleave(g, dim=0),
                        rest.last_hidden_state[:, :-1]], dim=1)
    return token_logps_and_entropy(hidden, model.get_output_embeddings(), completion_ids, chunk_size,
                                   with_entropy=with_entropy, temperature=rollout.temperature)


# KV caches for the two passes of `prefix_shared_logps`. Under (non-reentrant) gradient checkpointing a
# layer's forward runs again in the backward, cache calls included. Transformers' DynamicCache appends on
# every call, so the replay would see its keys twice; these two give the same keys on every call: the
# prompt pass's layers keep the last keys they were given (the replay writes the same keys again), and the
# completion pass's layers return the prompt's keys joined to the new ones and store nothing.

@functools.cache
def _kv_layers():
    from transformers.cache_utils import DynamicLayer  # imported here: transformers loads only when used

    class PromptKV(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class ReadOnlyKV(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PromptKV, ReadOnlyKV


def _prompt_cache():
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_kv_layers()[0])


def _repeated_read_only(prompt_kv, repeats: int):
    """The prompts' keys and values repeated for their completions (differentiably: the completions'
    gradients add up per prompt), in layers that never change."""
    from transformers.cache_utils import Cache

    layers = []
    for i, layer in enumerate(prompt_kv.layers):
        if not layer.is_initialized:
            raise NotImplementedError(f"prefix sharing: decoder layer {i} kept no keys for the prompt "
                                      "(a model whose layers share or skip their KV cache)")
        copy = _kv_layers()[1]()
        copy.lazy_initialization(layer.keys, layer.values)
        copy.keys = layer.keys.repeat_interleave(repeats, dim=0)
        copy.values = layer.values.repeat_interleave(repeats, dim=0)
        layers.append(copy)
    return Cache(layers=layers)


class _checkpointed_layers_keep_cache:
    """Lets the language model's checkpointed layers take the caches above: without this a Transformers
    layer under gradient checkpointing drops any cache it is given (which is right for a cache that grows)."""

    def __init__(self, lm):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]

    def __enter__(self):
        for layer in self.layers:
            layer._can_checkpoint_with_cache = True

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


# ------------------------------------------------------------------------------------------------
# The straightforward computation (what the reference implementation does), for tests and bench.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def naive_logps(model, rollout: Rollout, condition: str, permutations: list[torch.Tensor | None] | None = None
                ) -> torch.Tensor:
    """Full forward over all N rows with pixels re-encoded and full float32 logits.

    condition: "real"; "masked" (visual tokens masked from attention, positions from the full
    mask); "shuffled" (pixel rows of whole temporal patches permuted, then re-encoded).
    """
    visual = rollout.repeated_visual_inputs()
    attention_mask = rollout.attention_mask
    if condition == "masked":
        ids = visual_tokens(model.config)
        attention_mask = attention_mask * ~torch.isin(rollout.input_ids, torch.tensor([ids.video, ids.image]))
    elif condition == "shuffled" and "video_grid_thw" not in visual:  # a temporal patch is one frame
        repeated = [perm for perm in permutations for _ in range(rollout.group_size)]
        visual = shuffle_frames(model, visual, repeated)
    elif condition == "shuffled":
        repeated = [perm for perm in permutations for _ in range(rollout.group_size)]
        visual["pixel_values_videos"] = _permute_pixel_rows(visual["pixel_values_videos"],
                                                            visual["video_grid_thw"], repeated)
    elif condition != "real":
        raise ValueError(f"unknown condition {condition!r}")
    logits = model(input_ids=rollout.input_ids, attention_mask=attention_mask, position_ids=rollout.position_ids,
                   **visual).logits.float() / rollout.temperature
    model.model.rope_deltas = None
    p = rollout.prompt_length
    logps = torch.log_softmax(logits[:, p - 1: -1], dim=-1)
    return logps.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def _permute_pixel_rows(pixels: torch.Tensor, grids: torch.Tensor, permutations: list) -> torch.Tensor:
    """Permute whole temporal patches in the processor's flat pixel layout: each video is
    t blocks of h*w rows, one block per temporal patch."""
    out = []
    for block, grid, perm in zip(torch.split(pixels, grids.prod(dim=1).tolist()), grids.tolist(), permutations,
                                 strict=True):
        t = grid[0]
        out.append(block if perm is None else block.view(t, -1, block.shape[-1])[perm].reshape_as(block))
    return torch.cat(out, dim=0)
