"""Loading Video-LLMs and their processors, turning clips into model inputs, and building a tiny model.

Everything goes through the Auto classes, so a real checkpoint (a local path or hub id) and the
tiny model built by `python -m common.models build-tiny --out DIR` take the same path:

    model = load_model(path, dtype="bfloat16", attn_implementation="flash_attention_2")
    processor = load_processor(path, frames_cfg)      # frames_cfg: pixel budgets (optional)
    inputs = model_inputs(processor, [prompt], [clip])
    ids = generate_exact(model, inputs, max_new_tokens=64, do_sample=False)

Placeholder token ids (video / image / vision start / end) are read from the model config,
never hard-coded; how a processor lays a video out (Qwen3-VL's `<t seconds>` text per temporal patch)
and sizes its frames is read from the processor itself (`video_format`), never from a model name: a
LLaVA-style processor resizes every frame to one fixed size and expands `<video>` alone, with no grids.
Stages that cache, share or permute visual features outside the model's forward get them from
`encode_visual` with the DeepStack levels the encoder returns (Qwen3-VL), and feed them back with
`embed_visual` (and `add_deepstack` when running decoder layers by hand), at the positions `position_ids`
gives, as the model's forward does; `visual_layout(model)` says how positions are numbered (3-D M-RoPE or
1-D) and which visual features belong to no frame (LLaVA's newline after a video).
`build-tiny --arch qwen3_vl` builds the tiny Qwen3-VL, `--arch llava_onevision` a tiny LLaVA-OneVision
(SigLIP + Qwen2, 1-D positions, every frame its own image pooled 2 x 2, one newline token per video).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from common.frames import FramesConfig
    from common.video import Clip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class VisualTokens:
    """Ids of the placeholder tokens a processor expands into visual features."""

    video: int
    image: int
    vision_start: int | None = None
    vision_end: int | None = None

    @property
    def placeholders(self) -> tuple[int, ...]:
        """Ids a policy must never generate: the visual features have no text meaning."""
        return tuple(t for t in (self.video, self.image, self.vision_start, self.vision_end) if t is not None)


def visual_tokens(config) -> VisualTokens:
    """Read placeholder ids from a model config (Qwen2-VL names first, LLaVA-style names as fallback)."""

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        return None

    video = first("video_token_id", "video_token_index")
    image = first("image_token_id", "image_token_index")
    if video is None or image is None:
        raise ValueError(
            f"model config {type(config).__name__} has no video_token_id / image_token_id: "
            "is this a video-capable Video-LLM?"
        )
    return VisualTokens(video=video, image=image, vision_start=first("vision_start_token_id"),
                        vision_end=first("vision_end_token_id"))


@dataclass(frozen=True)
class VideoFormat:
    """How a processor writes a video into the prompt and sizes its frames, read from the processor.

    Qwen2-VL / Qwen2.5-VL expand the chat template's `<|video_pad|>` into one run of video tokens and
    place time through RoPE alone. Qwen3-VL expands it into one `<t seconds><|vision_start|>pads<|vision_end|>`
    block per temporal patch (t from the video metadata): the template's own wrapper around the pad must
    then go, or the text comes out nested as `<|vision_start|><t seconds><|vision_start|>...` (transformers
    5.24), which is not the layout those checkpoints were trained on. LLaVA-OneVision resizes every frame to
    one fixed size (no pixel budget, no grids) and expands `<video>` into frames x pooled patches plus one
    newline token, with no wrapper and no timestamps: the frames' order is all it knows of time.
    """

    timestamps_as_text: bool  # the processor writes its own timestamps and per-frame wrappers
    template_wrapper: str  # what the template puts around the video placeholder ('' = nothing to strip)
    video_token: str
    size_per_video: bool  # size["longest_edge"] caps t * h * w (Qwen3-VL), not h * w (Qwen2-VL)
    fixed_frame_size: bool = False  # every frame is resized to size["height"] x size["width"] (LLaVA-OneVision)
    # Frames the processor packs into one temporal patch, which the vision tower encodes together and apart
    # from the other patches (Qwen-VL: temporal_patch_size, 2); 1 = every frame alone (LLaVA-OneVision).
    frames_per_patch: int = 1


def _frame_factor(video_processor) -> int:
    """Side of one merged visual token in pixels (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    return video_processor.patch_size * video_processor.merge_size


_VIDEO_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def video_format(processor) -> VideoFormat:
    """The processor's VideoFormat, measured once per processor object on tiny blank videos (both families
    name their settings alike, e.g. `max_video_tokens`, with different meanings, so behaviour is what counts).

    Timestamps as text: expanding one video placeholder of a one-patch video adds tokens of its own.
    Per-video size: with a budget of 4 tokens per frame of one temporal patch, twice the frames come out
    smaller only if the budget is for the whole video.
    """
    if processor in _VIDEO_FORMATS:
        return _VIDEO_FORMATS[processor]
    vp = processor.video_processor
    if vp.size.get("longest_edge") is None:  # no pixel budget: one fixed frame size, no patches to probe
        fmt = VideoFormat(timestamps_as_text=False, template_wrapper="", video_token=processor.video_token,
                          size_per_video=False, fixed_frame_size=True)
        _VIDEO_FORMATS[processor] = fmt
        return fmt
    f, tp = _frame_factor(vp), vp.temporal_patch_size
    meta = {"fps": 1.0, "total_num_frames": tp, "frames_indices": list(range(tp))}
    video_token = processor.video_token
    ids = processor(text=[video_token], videos=[np.zeros((tp, f, f, 3), np.uint8)], video_metadata=[meta],
                    do_sample_frames=False)["input_ids"][0]
    as_text = any(int(i) != processor.tokenizer.convert_tokens_to_ids(video_token) for i in ids)
    wrapper = processor.vision_start_token + video_token + processor.vision_end_token if as_text else ""

    sized = copy.deepcopy(vp)
    sized.size = type(vp.size)(shortest_edge=f * f, longest_edge=4 * f * f * tp)
    grids = [sized(videos=[np.zeros((n, 2 * f, 2 * f, 3), np.uint8)], do_sample_frames=False,
                   cap_pixels_per_frame=False, return_tensors="pt")["video_grid_thw"][0, 1:].tolist()
             for n in (tp, 2 * tp)]
    fmt = VideoFormat(timestamps_as_text=as_text, template_wrapper=wrapper, video_token=video_token,
                      size_per_video=grids[0] != grids[1], frames_per_patch=tp)
    _VIDEO_FORMATS[processor] = fmt
    return fmt


def model_path_ok(path: str) -> bool:
    """A local checkpoint directory that exists, or something shaped like a hub id (`org/name`)
    whose first part is not a local directory (so a mistyped `outputs/...` path is caught)."""
    p = Path(path)
    if p.exists():
        return True
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith(".") and not Path(parts[0]).exists()


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str | None = None,
               device: str | torch.device | None = None):
    """A Video-LLM through `AutoModelForImageTextToText`, from a local path or a hub id."""
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    if device is not None:
        model.to(device)
    return model


def load_processor(path: str | Path, frames: FramesConfig | None = None):
    """The model's processor; left padding so batched generation appends after every prompt.

    With `frames`, its pixel budgets (`max_pixels` per video frame, `image_max_pixels` per image;
    0 = the processor's saved default) are applied once here, so every stage that passes its frames
    config feeds the model the same resolution.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    if video_format(processor).size_per_video and processor.video_processor.cap_pixels_per_frame is None:
        processor.video_processor.cap_pixels_per_frame = True  # what qwen-vl-utils does (ENVIRONMENT.md)
    if frames is not None:
        apply_pixel_budget(processor, frames.max_pixels, frames.image_max_pixels)
    return processor


def _cap_size(sub_processor, max_pixels: int, name: str) -> None:
    size = getattr(sub_processor, "size", None)
    if size is None or size.get("shortest_edge") is None or size.get("longest_edge") is None:
        raise ValueError(f"{name} {type(sub_processor).__name__} has no pixel-count size (size={size!r}); "
                         "pixel budgets need a Qwen2-VL-style processor (for one that resizes every frame to a "
                         "fixed size, e.g. LLaVA-OneVision, leave the budget at 0: frames.max_pixels and "
                         "frames.image_max_pixels in train/eval configs, max_pixels in label_frames.py)")
    # Qwen2-VL processors resize each frame to at most size["longest_edge"] pixels (smart_resize on the
    # 28-px grid); the minimum moves down with it, so a budget below the saved minimum still binds.
    sub_processor.size = type(size)(shortest_edge=min(size["shortest_edge"], max_pixels), longest_edge=max_pixels)


def apply_pixel_budget(processor, max_pixels: int = 0, image_max_pixels: int = 0) -> None:
    """Cap the pixels per video frame / per image of a Qwen-VL-style processor in place (0 = leave as saved).

    Qwen3-VL's video processor reads size["longest_edge"] as a budget for the whole video (t * h * w); its
    per-frame cap is `max_video_tokens` merged tokens (with cap_pixels_per_frame), so that is what a
    per-frame budget sets there, keeping the budget's meaning the same for every family.
    """
    if max_pixels:
        vp = processor.video_processor
        if video_format(processor).size_per_video:
            tokens = max_pixels // _frame_factor(vp) ** 2
            if tokens < 1:
                raise ValueError(f"max_pixels {max_pixels} is below one {_frame_factor(vp)}-px token")
            vp.max_video_tokens, vp.cap_pixels_per_frame = tokens, True
            vp.size = type(vp.size)(shortest_edge=min(vp.size["shortest_edge"], max_pixels),
                                    longest_edge=vp.size["longest_edge"])
        else:
            _cap_size(vp, max_pixels, "video processor")
    if image_max_pixels:
        _cap_size(processor.image_processor, image_max_pixels, "image processor")


def video_max_pixels(processor) -> int:
    """The per-frame pixel cap the processor applies now (size["longest_edge"], or for a per-video size the
    max_video_tokens per frame, or for a fixed frame size its height x width)."""
    vp = processor.video_processor
    if video_format(processor).fixed_frame_size:
        return int(vp.size["height"] * vp.size["width"])
    if video_format(processor).size_per_video and vp.cap_pixels_per_frame:
        return int(vp.max_video_tokens * _frame_factor(vp) ** 2)
    return int(vp.size["longest_edge"])


def generate_exact(model, inputs: Mapping, *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 0, num_return_sequences: int = 1,
                   bad_words_ids: list[list[int]] | None = None, synced_gpus: bool | None = None) -> torch.Tensor:
    """`model.generate` decoding with exactly these parameters; returns prompt + completion ids.

    transformers fills every generation parameter we leave unset from the checkpoint's
    generation_config.json, even when we pass our own GenerationConfig: Qwen2.5-VL ships
    repetition_penalty=1.05, top_k, top_p, temperature and do_sample, which would silently change
    what we sample and what "greedy" means. So for the length of the call the model's generation
    config is swapped for a fresh one that keeps only the special token ids, and every sampling
    parameter is set here. `top_k=0` means no top-k filter (transformers' own default would be 50).
    """
    from transformers import GenerationConfig

    if do_sample:
        if not temperature > 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    saved = model.generation_config
    ids = {k: getattr(saved, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0,
                   eta_cutoff=0.0, encoder_repetition_penalty=1.0, min_length=0, num_beams=1, length_penalty=1.0)
    if do_sample:
        sampling = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    else:  # transformers' neutral values: unused by greedy search, and they raise no "flag ignored" warning
        sampling = dict(temperature=1.0, top_p=1.0, top_k=50)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, bad_words_ids=bad_words_ids,
                              num_return_sequences=num_return_sequences, **neutral, **sampling, **ids)
    model.generation_config = GenerationConfig(**ids)
    try:
        return model.generate(**inputs, generation_config=config, synced_gpus=synced_gpus)
    finally:
        model.generation_config = saved


def chat_messages(prompt: str, data_type: str = "video") -> list[dict]:
    """One user turn: the visual input first, then the text (the order Video-R1 uses)."""
    return [{"role": "user", "content": [{"type": data_type}, {"type": "text", "text": prompt}]}]


def chat_text(processor, prompt: str, data_type: str = "video", target: str | None = None) -> str:
    """The chat-formatted prompt; with `target`, the assistant turn is appended for teacher forcing.

    For a processor that writes timestamps as text (VideoFormat), the template's wrapper around the video
    placeholder is dropped, so the processor's `<t seconds><|vision_start|>pads<|vision_end|>` blocks
    stand on their own, as in the reference Qwen3-VL processors.
    """
    text = processor.apply_chat_template(chat_messages(prompt, data_type), tokenize=False,
                                         add_generation_prompt=True)
    fmt = video_format(processor)
    if data_type == "video" and fmt.template_wrapper:
        text = text.replace(fmt.template_wrapper, fmt.video_token)
    if target is not None:
        eos = processor.tokenizer.eos_token or ""
        text = text + target + eos
    return text


def clip_metadata(clip: Clip) -> dict:
    """Video metadata the processor needs to place frames in time.

    Without it the Qwen2-VL processors assume 24 fps and the temporal RoPE positions collapse
    (see ENVIRONMENT.md). `frames_indices` + the source fps give the effective sampling rate.
    """
    return {"fps": float(clip.fps), "total_num_frames": int(clip.total_frames),
            "frames_indices": [int(i) for i in clip.indices]}


def model_inputs(processor, prompts: Sequence[str], visuals: Sequence[Clip | np.ndarray],
                 targets: Sequence[str] | None = None):
    """Batched processor inputs (left-padded) for prompts over video clips or images.

    A visual is a `Clip` (video) or an H x W x 3 uint8 array (image). Returns the processor's
    BatchFeature (input_ids, attention_mask, pixel_values_videos, video_grid_thw,
    second_per_grid_ts, mm_token_type_ids, ...); pass all of it to the model, since without
    `mm_token_type_ids` Qwen2.5-VL silently falls back to 1-D positions. With `targets`, each
    text ends with its assistant answer, for teacher forcing.
    """
    if len(prompts) != len(visuals):
        raise ValueError(f"{len(prompts)} prompts but {len(visuals)} visuals")
    texts, videos, metadata, images = [], [], [], []
    for i, (prompt, visual) in enumerate(zip(prompts, visuals, strict=True)):
        is_video = not isinstance(visual, np.ndarray)
        texts.append(chat_text(processor, prompt, "video" if is_video else "image",
                               None if targets is None else targets[i]))
        if is_video:
            videos.append(np.ascontiguousarray(visual.frames))
            metadata.append(clip_metadata(visual))
        else:
            images.append(visual)
    kwargs = {}
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
    if images:
        kwargs.update(images=images)
    return processor(text=texts, padding=True, return_tensors="pt", **kwargs)


# ---------------------------------------------------------------------------------------------
# Visual features outside the model's own forward (cached, shared or permuted by the stages).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisualLayout:
    """How a model places visual features in its sequence, read from the model's modules (never its name).

    Qwen-VL numbers positions in 3-D (M-RoPE: time, height, width) with its own index over the processor's
    video_grid_thw and token types, and a video's features are its temporal patches' and nothing else.
    LLaVA-OneVision numbers positions 1-D (0..L-1, what its language model uses when given none), and ends
    each video's features with one learned newline token (`image_newline`) that no frame produced. Its tower
    encodes every frame alone, and its images are tiled "anyres" and packed by a path of their own
    (`get_image_features` takes `image_sizes`, not grids), so images and videos need two tower calls.
    """

    mrope: bool  # 3-D positions from the model's `get_rope_index`; else 1-D
    video_end_tokens: int  # features after each video's frames that belong to no frame (LLaVA: the newline)
    frames_per_patch: int = 1  # frames the tower encodes together (Qwen-VL: temporal_patch_size 2; LLaVA: 1)
    image_grids: bool = True  # images are encoded from grids like videos, in the same tower call (Qwen-VL)


def visual_layout(model) -> VisualLayout:
    return VisualLayout(mrope=hasattr(model.model, "get_rope_index"),
                        video_end_tokens=int(getattr(model.model, "image_newline", None) is not None),
                        frames_per_patch=int(getattr(model.config.vision_config, "temporal_patch_size", 1)),
                        image_grids="image_grid_thw" in inspect.signature(model.model.get_image_features).parameters)


def position_ids(model, inputs: Mapping) -> torch.Tensor:
    """The RoPE positions the model's own forward gives processed `inputs`: (3, B, L) from its M-RoPE index
    (computed with the full attention mask; ENVIRONMENT.md), or (B, L) 0..L-1 for 1-D RoPE."""
    ids = inputs["input_ids"]
    if not visual_layout(model).mrope:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    positions, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"])
    return positions


def encode_visual(model, pixels: torch.Tensor, grids: torch.Tensor | None) -> list[torch.Tensor]:
    """The vision tower's features of each item of `grids` (videos and images alike), in one call.

    Each item is (tokens, 1 + D, hidden): level 0 replaces the item's placeholder tokens; levels 1..D are
    the DeepStack features the encoder returns next to them (Qwen3-VL: from intermediate vision layers),
    which the language model adds to its hidden states at the same positions after each of its first D
    layers. D = 0 when the encoder returns none (Qwen2-VL, Qwen2.5-VL). Keeping the levels in one tensor
    means anything that caches, repeats or permutes visual tokens carries all of them together.

    Without grids (LLaVA-OneVision) `pixels` are videos of equal length, (videos, frames, C, H, W), and each
    video's features are its frames' tokens in order, then `visual_layout(model).video_end_tokens`.
    """
    if grids is None:
        return [video.unsqueeze(1) for video in model.model.get_video_features(pixels).pooler_output]
    out = model.model.get_video_features(pixels, grids)
    deepstack = getattr(out, "deepstack_features", None) or []
    return [torch.stack([main, *(level[i] for level in deepstack)], dim=1) for i, main in enumerate(out.pooler_output)]


def embed_visual(embeds: torch.Tensor, visual_mask: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Token embeddings (B, L, hidden) with `visual` (n, 1 + D, hidden) at the n True positions of
    `visual_mask` (B, L), in row-major order, and the language model's keyword arguments that inject the
    DeepStack levels there ({} when D = 0): what the model's own forward does with its encoder's output."""
    embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1).expand_as(embeds), visual[:, 0].to(embeds.dtype))
    if visual.shape[1] == 1:
        return embeds, {}
    return embeds, {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": list(visual[:, 1:].unbind(1))}


def add_deepstack(hidden: torch.Tensor, layer: int, deepstack: dict) -> torch.Tensor:
    """The hidden states after decoder layer `layer` as the language model passes them on: plus that
    layer's DeepStack level at the visual positions, if `deepstack` (from `embed_visual`) has one."""
    levels = deepstack.get("deepstack_visual_embeds", [])
    if layer >= len(levels):
        return hidden
    mask = deepstack["visual_pos_masks"]
    hidden = hidden.clone()
    hidden[mask] = hidden[mask] + levels[layer].to(hidden.dtype)
    return hidden


# ---------------------------------------------------------------------------------------------
# The tiny model: a real architecture with random weights and a locally trained tokenizer.
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen-style chat template: the visual placeholder goes where the content item says.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# LLaVA-OneVision's tokenizer is Qwen2's (ChatML) with `<image>` and `<video>` added; its template puts the
# visual placeholders right after the role, then each text on its own line.
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ '\\n' + item['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")


@dataclass
class TinySpec:
    """Sizes of the tiny model; defaults are small enough for CPU training in minutes."""

    arch: str = "qwen2_5_vl"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vocab_size: int = 1024  # tokenizer size to train (model vocab is padded to a multiple of 64)
    model_vocab: int = 0  # embedding / LM-head rows; 0 = the tokenizer's size (152064 = Qwen2.5-VL's real head)
    min_pixels: int = 28 * 28
    max_pixels: int = 112 * 112
    seed: int = 0


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the project's prompts and tinyworld's vocabulary."""
    from common import tinyworld
    from common.data import ANSWER_FORMAT, THINK_ANSWER_INSTRUCTION

    lines = [THINK_ANSWER_INSTRUCTION, *ANSWER_FORMAT.values(), "Options:", "user", "assistant",
             "<think>", "</think>", "<answer>", "</answer>", "A B C D E 0 1 2 3 4 5 6 7 8 9 . , ? !"]
    lines += tinyworld.vocabulary()
    return lines


def train_tokenizer(corpus: Sequence[str], vocab_size: int, special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
                    chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE with Qwen's pre-tokenizer, wrapped as the Qwen2 tokenizer class; `special_tokens`
    starts with `<|endoftext|>` (padding) and holds `<|im_end|>` (end of turn)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(corpus) * 4, trainer=trainer)
    saved = json.loads(bpe.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=saved["model"]["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Build, save and return the path of a tiny randomly initialised Video-LLM + processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    spec = spec or TinySpec()
    if spec.arch not in TINY_ARCHS:
        raise ValueError(f"--arch {spec.arch!r}: supported are {', '.join(TINY_ARCHS)}")
    head_dim = spec.hidden // spec.heads
    if head_dim % 4 or spec.hidden % spec.heads:
        raise ValueError(f"hidden {spec.hidden} / heads {spec.heads} must give a head_dim divisible by 4")
    torch.manual_seed(spec.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if spec.arch == "llava_onevision":
        tokenizer = train_tokenizer(tokenizer_corpus(), spec.vocab_size, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE)
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(), spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + LLAVA_SPECIAL_TOKENS[3:]}
    vocab = max(spec.model_vocab, -(-len(tokenizer) // 64) * 64)

    # mrope splits head_dim/2 rotary frequencies over (time, height, width), in Qwen's 1:1.5:1.5 ratio.
    half = head_dim // 2
    section_t = half // 4
    mrope = [section_t, (half - section_t) // 2, half - section_t - (half - section_t) // 2]
    text = dict(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                num_key_value_heads=spec.kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec.arch == "qwen2_5_vl":
        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                      intermediate_size=2 * spec.vision_hidden, out_hidden_size=spec.hidden,
                      fullatt_block_indexes=[spec.vision_depth - 1], window_size=112,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor = _qwen2_vl_processor(Qwen2_5_VLProcessor, spec, tokenizer)
    elif spec.arch == "qwen2_vl":
        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden, num_heads=spec.vision_heads,
                      mlp_ratio=2, hidden_size=spec.hidden, patch_size=14, temporal_patch_size=2,
                      spatial_merge_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = Qwen2VLForConditionalGeneration(config)
        processor = _qwen2_vl_processor(Qwen2VLProcessor, spec, tokenizer)
    elif spec.arch == "qwen3_vl":
        model, processor = _tiny_qwen3_vl(spec, text, token_ids, tokenizer)
    else:
        model, processor = _tiny_llava_onevision(spec, text, ids, tokenizer)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "tiny_spec.json").write_text(json.dumps({**spec.__dict__, "parameters": n_params}, indent=2))
    return out


def _qwen2_vl_processor(processor_cls, spec: TinySpec, tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14,
                  temporal_patch_size=2, merge_size=2)
    return processor_cls(image_processor=Qwen2VLImageProcessor(**pixels),
                         video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=False),
                         tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _tiny_qwen3_vl(spec: TinySpec, text: dict, token_ids: dict, tokenizer):
    """Qwen3-VL's differences from the Qwen2.5-VL recipe: interleaved M-RoPE, 16-px patches with learned
    position embeddings, DeepStack (the first vision block's features added into the first LLM layer), and
    a video processor whose size budget is per video, so the per-frame cap is set as `max_video_tokens`."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    head_dim = spec.hidden // spec.heads
    half = head_dim // 2
    hw = half * 5 // 16  # Qwen3-VL's [24, 20, 20] of 64 frequencies, interleaved T, H, W
    text = {k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True}
    text.update(head_dim=head_dim, rope_parameters=rope)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                  intermediate_size=2 * spec.vision_hidden, out_hidden_size=spec.hidden, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=False, **token_ids))
    # spec.max_pixels per frame: max_video_tokens merged 32-px tokens; the whole-video size never binds
    # below the processor's max_frames (768).
    tokens_per_frame = max(1, spec.max_pixels // 32**2)
    size = {"shortest_edge": spec.min_pixels, "longest_edge": tokens_per_frame * 32**2 * 768}
    video = Qwen3VLVideoProcessor(size=size, patch_size=16, temporal_patch_size=2, merge_size=2,
                                  cap_pixels_per_frame=True, max_video_tokens=tokens_per_frame)
    image = Qwen2VLImageProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=16,
                                  temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(image_processor=image, video_processor=video, tokenizer=tokenizer,
                                 chat_template=CHAT_TEMPLATE)
    return model, processor


def _tiny_llava_onevision(spec: TinySpec, text: dict, ids: dict, tokenizer):
    """LLaVA-OneVision: a SigLIP vision tower (no CLS token, no pooling head) whose last-layer patch features
    go through a 2-layer MLP projector into a Qwen2 language model with ordinary 1-D RoPE. A video is its
    frames encoded one by one at one fixed size, each frame's patch grid pooled 2 x 2 (bilinear), then one
    learned newline token after the whole video; an image is tiled "anyres" (base view + grid tiles).
    The frame side is spec.max_pixels' square root, rounded down to the 14-px patch."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    patch = 14
    side = max(patch, int(spec.max_pixels**0.5) // patch * patch)
    text = {k: v for k, v in text.items() if k != "rope_parameters"}
    text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_depth,
                  num_attention_heads=spec.vision_heads, intermediate_size=2 * spec.vision_hidden, patch_size=patch,
                  image_size=side, vision_use_head=False)
    pinpoints = [[side * rows, side * cols] for rows in (1, 2) for cols in (1, 2)]  # anyres tiles, up to 2 x 2
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config)
    size, norm = {"height": side, "width": side}, dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # SigLIP's
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints, **norm),
        video_processor=LlavaOnevisionVideoProcessor(size=size, **norm), tokenizer=tokenizer,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


# Published architectures (their config.json, in transformers 5's keys), for planning runs without the weights.
QWEN2_5_VL_7B = dict(
    model_type="qwen2_5_vl",
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)
QWEN3_VL_8B = dict(
    model_type="qwen3_vl",
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
PLANS = {"qwen2_5_vl": ("Qwen2.5-VL-7B", QWEN2_5_VL_7B), "qwen3_vl": ("Qwen3-VL-8B", QWEN3_VL_8B)}


def meta_model(arch: dict | str | Path = QWEN2_5_VL_7B):
    """An architecture on the meta device: shapes and parameter counts, no memory, no weights. `arch` is a
    config dict with its model_type (QWEN2_5_VL_7B, QWEN3_VL_8B) or a checkpoint directory (its config.json)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if isinstance(arch, dict):
        config = AutoConfig.for_model(**arch)
    else:
        config = AutoConfig.from_pretrained(arch)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def zero3_memory_gib(n_params: int, n_trainable: int, gpus: int, with_reference: bool) -> dict[str, float]:
    """Per-GPU memory for weights and optimizer under ZeRO-3 with bf16 + AdamW (fp32 master weights and
    two moments: 12 bytes per trainable parameter), activations excluded. The reference model is
    sharded like the policy (train_ktr.prepare_reference); generation gathers the whole policy for
    the length of a `generate` call."""
    gib = 1024**3
    out = {"policy weights (bf16, sharded)": 2 * n_params / gpus / gib,
           "gradients (bf16, sharded)": 2 * n_trainable / gpus / gib,
           "AdamW states + fp32 master (sharded)": 12 * n_trainable / gpus / gib}
    if with_reference:
        out["reference model (bf16, sharded)"] = 2 * n_params / gpus / gib
    out["policy gathered for generation (bf16, transient)"] = 2 * n_params / gib
    out["total before activations"] = sum(out.values())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.models")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("build-tiny", help="build a tiny randomly initialised Video-LLM")
    tiny.add_argument("--out", required=True)
    for name, value in TinySpec().__dict__.items():
        tiny.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    plan = sub.add_parser("plan", aliases=["plan-7b"],
                          help="a paper-scale model on the meta device: parameters, ids, ZeRO-3 memory per GPU")
    which = plan.add_mutually_exclusive_group()
    which.add_argument("--arch", choices=sorted(PLANS), default="qwen2_5_vl", help="a published architecture")
    which.add_argument("--model", help="a checkpoint directory: its config.json, no weights read")
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.command in ("plan", "plan-7b"):
        name, arch = (args.model, args.model) if args.model else PLANS[args.arch]
        model = meta_model(arch)
        n = sum(p.numel() for p in model.parameters())
        trainable = n - (sum(p.numel() for p in model.get_encoder("video").parameters()) if args.freeze_vision else 0)
        ids = visual_tokens(model.config)
        print(f"{name}: {n / 1e9:.2f}B parameters ({trainable / 1e9:.2f}B trained), "
              f"{model.config.get_text_config().num_hidden_layers} language layers; "
              f"video token {ids.video}, image {ids.image}")
        for key, value in zero3_memory_gib(n, trainable, args.gpus, with_reference=True).items():
            print(f"  {key:<50}{value:6.1f} GiB per GPU ({args.gpus} GPUs)")
        return
    spec = TinySpec(**{k: getattr(args, k) for k in TinySpec().__dict__})
    out = build_tiny(args.out, spec)
    info = json.loads((out / "tiny_spec.json").read_text())
    print(f"built tiny {spec.arch} ({info['parameters']:,} parameters) -> {out}")


if __name__ == "__main__":
    main()
