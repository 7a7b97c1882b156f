"""Frame selection: which frames of a video a Video-LLM sees.

One small interface for every strategy: `make_selector(cfg)` returns a function
`select(sample) -> Clip`. The simple strategies only compute indices; learned ones (Frame-Voyager)
and retrieval read candidate frames, score them against the question, and keep the best; the
training-free AKS (relevance + coverage) and DPP (relevance + diversity) choose from the same scores.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.config import require
from common.data import Sample
from common.video import Clip, VideoError, probe, read_frames, uniform_indices

Strategy = Literal["uniform", "evidence", "fps", "all", "random", "segment", "voyager", "retrieval", "aks", "dpp"]
CANDIDATE_STRATEGIES = ("random", "voyager", "retrieval", "aks", "dpp")  # choose T of M uniform candidates


@dataclass
class FramesConfig:
    strategy: Strategy = "uniform"
    num: int = 8  # frames given to the model (uniform; the T chosen by voyager / retrieval / aks / dpp)
    fps: float = 1.0  # sampling rate for strategy=fps
    max_frames: int = 64  # cap for strategy=fps and strategy=all
    # strategy=fps: with min_frames > 0 the count follows qwen-vl-utils (Video-R1): duration * fps clamped to
    # [min_frames, max_frames] and the frame count, rounded down to even (2 frames = 1 temporal patch),
    # spread uniformly. 0 = the plain per-interval sampling.
    min_frames: int = 0
    max_pixels: int = 0  # pixel budget per video frame (processor size["longest_edge"]); 0 = processor default
    image_max_pixels: int = 0  # pixel budget per image; 0 = processor default
    candidates: int = 16  # M candidate frames scored by voyager / retrieval / aks / dpp
    voyager: str = ""  # directory of a trained Frame-Voyager (voyager.json + voyager.safetensors)
    # How strategy=voyager turns its frame scores into T frames: "top" (the paper: the T best), "aks" (AKS's
    # judge-and-split on the scores, common.selectors.aks_select: where no part of the video stands out, the
    # frames stay spread over it) or "dpp" (common.selectors.dpp_select: the scores as quality, the frames'
    # backbone features as similarity, so the T frames also differ from each other: set-aware, like MDP3).
    voyager_select: Literal["top", "aks", "dpp"] = "top"
    # AKS's judge (strategy=aks, voyager_select=aks): a segment whose top-k mean normalised score exceeds its mean by
    # more than this takes its top k; otherwise it is split in two. 0 = always the top T; 1 = always split (coverage).
    aks_threshold: float = 0.5
    # strategy=voyager with a scorer trained with `coverage=true`: the head's weight on evenness is multiplied by
    # this at selection (1 = as trained; 0 = the paper's top T of the same scorer's rewards; larger = more spread).
    coverage_scale: float = 1.0
    retrieval_model: str = ""  # CLIP/SigLIP path for retrieval / aks / dpp; empty = the answering model's embeddings
    seed: int = 0  # strategy=random / segment: the draws depend on (seed, epoch, problem_id) only
    # Decoded frames kept in memory (MiB, least recently used out first) for the strategies that read the same
    # frames of a video every time (uniform, fps, all, evidence): a multi-epoch SFT then decodes each video
    # once. 0 = off. Costs frames x H x W x 3 bytes per video (8 x 112 x 112: 0.3 MiB).
    cache_mb: int = 0

    def validate(self, prefix: str = "frames") -> None:
        require(self.num > 0, f"{prefix}.num", f"must be > 0, got {self.num}")
        require(self.fps > 0, f"{prefix}.fps", f"must be > 0, got {self.fps}")
        require(self.max_frames > 0, f"{prefix}.max_frames", f"must be > 0, got {self.max_frames}")
        require(self.cache_mb >= 0, f"{prefix}.cache_mb", f"must be >= 0 (0 = off), got {self.cache_mb}")
        require(0.0 <= self.aks_threshold <= 1.0, f"{prefix}.aks_threshold",
                f"must be in [0, 1] (scores are normalised to [0, 1]), got {self.aks_threshold}")
        require(self.coverage_scale >= 0, f"{prefix}.coverage_scale", f"must be >= 0, got {self.coverage_scale}")
        require(self.min_frames >= 0, f"{prefix}.min_frames", f"must be >= 0 (0 = off), got {self.min_frames}")
        if self.min_frames:
            require(self.min_frames <= self.max_frames, f"{prefix}.min_frames",
                    f"{self.min_frames} must be <= {prefix}.max_frames={self.max_frames}")
            require(self.max_frames >= 2, f"{prefix}.max_frames",
                    f"must be >= 2 with {prefix}.min_frames (counts are even), got {self.max_frames}")
        for key in ("max_pixels", "image_max_pixels"):
            require_pixel_budget(getattr(self, key), f"{prefix}.{key}")
        if self.strategy in CANDIDATE_STRATEGIES:
            require(self.num <= self.candidates, f"{prefix}.num",
                    f"T={self.num} must be <= {prefix}.candidates M={self.candidates}")
        if self.strategy == "voyager":
            require(bool(self.voyager), f"{prefix}.voyager", "strategy=voyager needs the Voyager directory")


def require_pixel_budget(value: int, key: str) -> None:
    """A pixel budget is 0 (the processor's saved default) or at least one 28 x 28 merged patch."""
    require(value == 0 or value >= 28 * 28, key, f"must be 0 (processor default) or >= {28 * 28}, got {value}")


Selector = Callable[[Sample], Clip]


def make_selector(cfg: FramesConfig, model=None, processor=None) -> Selector:
    """The frame selector for `cfg.strategy`; frames come back in temporal order.

    `model` / `processor` are the answering Video-LLM, which retrieval / aks / dpp may use for its embeddings
    when no CLIP/SigLIP model is configured; the simple strategies ignore them.
    """
    select = _make_selector(cfg, model, processor)
    if cfg.cache_mb and cfg.strategy in ("uniform", "fps", "all", "evidence"):
        return ClipCache(select, cfg.cache_mb * 2**20)
    return select


class ClipCache:
    """A selector that remembers its clips, up to `max_bytes` of frames (least recently used out first).

    Only for selectors whose clip is a function of the video file alone (and the fixed config): the key is
    the path with its size and modification time, so a file rewritten in place is read again. Each call
    returns its own copy of the frames (a memory copy, far cheaper than a decode), so a caller that changes
    them in place cannot reach later reads. A video that fails is not cached: it fails (and is recorded)
    every time it comes up, as without a cache.
    """

    def __init__(self, select: Selector, max_bytes: int):
        self.select, self.max_bytes, self.bytes = select, max_bytes, 0
        self.clips: OrderedDict[tuple, Clip] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, sample: Sample) -> Clip:
        st = os.stat(sample.path) if os.path.exists(sample.path) else None
        key = (str(sample.path), st and st.st_size, st and st.st_mtime_ns, tuple(sample.evidence_frames or ()))
        if key in self.clips:
            self.hits += 1
            self.clips.move_to_end(key)
            return _copy(self.clips[key])
        self.misses += 1
        clip = self.select(sample)
        if clip.frames.nbytes <= self.max_bytes:
            self.clips[key] = _copy(clip)
            self.bytes += clip.frames.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.clips.popitem(last=False)[1].frames.nbytes
        return clip


def _copy(clip: Clip) -> Clip:
    return dataclasses.replace(clip, frames=clip.frames.copy(), indices=list(clip.indices),
                               timestamps=list(clip.timestamps))


def _make_selector(cfg: FramesConfig, model=None, processor=None) -> Selector:
    if cfg.strategy == "uniform":
        return lambda sample: read_frames(sample.path, num_frames=cfg.num)
    if cfg.strategy == "fps":
        return lambda sample: read_frames(sample.path, fps=cfg.fps, max_frames=cfg.max_frames,
                                          min_frames=cfg.min_frames or None)
    if cfg.strategy == "all":
        return lambda sample: read_frames(sample.path, max_frames=cfg.max_frames)
    if cfg.strategy == "evidence":
        return lambda sample: read_evidence_frames(sample, cfg.num)
    if cfg.strategy == "random":
        return RandomSubsetSelector(cfg.candidates, cfg.num, cfg.seed)
    if cfg.strategy == "segment":
        return SegmentSelector(cfg.num, cfg.seed)
    if cfg.strategy == "voyager":  # the scorer (and its backbone, if not the answering model) loads once, here
        from common.voyager import VoyagerSelector

        return VoyagerSelector(cfg.voyager, cfg.candidates, cfg.num, model=model, processor=processor,
                               select=cfg.voyager_select, aks_threshold=cfg.aks_threshold,
                               coverage_scale=cfg.coverage_scale)
    if cfg.strategy == "retrieval":
        from common.voyager import RetrievalSelector

        return RetrievalSelector(cfg.candidates, cfg.num, model=model, processor=processor,
                                 retrieval_model=cfg.retrieval_model)
    if cfg.strategy in ("aks", "dpp"):  # training-free, on retrieval's embeddings
        from common.selectors import AKSSelector, DPPSelector

        if cfg.strategy == "aks":
            return AKSSelector(cfg.candidates, cfg.num, model=model, processor=processor,
                               retrieval_model=cfg.retrieval_model, threshold=cfg.aks_threshold)
        return DPPSelector(cfg.candidates, cfg.num, model=model, processor=processor,
                           retrieval_model=cfg.retrieval_model)
    raise ValueError(f"unknown frames.strategy={cfg.strategy!r}")


def evidence_indices(total_frames: int, num: int, evidence: Sequence[int]) -> list[int]:
    """Uniform frames that include an annotated evidence frame (`frames.strategy=evidence`).

    When no uniform frame shows the evidence, the one nearest the middle evidence frame moves onto it: the others
    keep their places, so the spacing stays uniform but for one frame. Without evidence in range, or with it
    already seen, uniform_indices as they are. In SFT this trains a model only on answers it can see (uniform
    frames miss a brief event, and its reasoning then names what no frame shows); in evaluation it is the
    oracle that shows what finding the evidence is worth.
    """
    indices = uniform_indices(total_frames, num)
    inside = sorted(e for e in set(evidence) if 0 <= e < total_frames)
    if not inside or set(inside) & set(indices):
        return indices
    target = inside[len(inside) // 2]
    nearest = min(range(num), key=lambda j: (abs(indices[j] - target), j))
    indices[nearest] = target  # strictly between its neighbours: a nearer neighbour would be the nearest
    return indices


def read_evidence_frames(sample: Sample, num: int) -> Clip:
    total = probe(sample.path)[0]
    indices = evidence_indices(total, num, sample.evidence_frames or [])
    if indices == uniform_indices(total, num):  # also a short video's repeated frames, as uniform reads them
        return read_frames(sample.path, num_frames=num)
    return read_frames(sample.path, indices=indices)


class RandomSubsetSelector:
    """T of M uniform candidates drawn at random, in temporal order, with their true timestamps.

    The draw is a function of (seed, epoch, problem_id) alone, so a resumed run draws what an uninterrupted
    one does, and every process draws the same for a sample. A trainer calls `set_epoch(e)` at each epoch
    (as with torch's DistributedSampler) to get new subsets; an evaluation keeps epoch 0. Training on these
    (`frames.strategy=random` in SFT) shows a model the uneven frame spacing that the selectors produce at
    test time; as a test-time strategy it is the control that any selector should beat.
    """

    def __init__(self, candidates: int, num: int, seed: int = 0):
        self.candidates, self.num, self.seed, self.epoch = candidates, num, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def positions(self, problem_id: str, m: int) -> list[int]:
        """Sorted positions of `num` of the `m` candidates for this sample and epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(str(problem_id).encode())])
        return sorted(rng.choice(m, size=self.num, replace=False).tolist())

    def __call__(self, sample: Sample) -> Clip:
        from common.voyager import pick_frames

        return pick_frames(sample, self.candidates, self.num,
                           lambda clip, query: self.positions(sample.problem_id, len(clip.indices)))


def segment_indices(total_frames: int, num: int, rng: np.random.Generator) -> list[int]:
    """One frame drawn uniformly from each of `num` equal segments of the video (TSN's training sampling, Wang
    et al., ECCV 2016); segment k holds frames [k * total // num, (k + 1) * total // num). A video with fewer
    frames than `num` gives what uniform sampling gives (frames repeat)."""
    if total_frames < num:
        return uniform_indices(total_frames, num)
    bounds = [k * total_frames // num for k in range(num + 1)]
    return [int(rng.integers(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


class SegmentSelector:
    """`frames.strategy=segment`: T frames spread as uniform's are, each drawn inside its own segment, so the
    frames keep uniform's coverage but not its exact positions (`segment_indices`). For training: a model trained
    only on uniform's fixed positions can come to depend on them (README, "Why count loses"); shown positions
    jittered within their segments, it sees what a frame selector's spread frames look like while still seeing
    the whole video. Draws as `RandomSubsetSelector`'s: a function of (seed, epoch, problem_id) alone; a trainer
    calls `set_epoch(e)`; an evaluation keeps epoch 0."""

    def __init__(self, num: int, seed: int = 0):
        self.num, self.seed, self.epoch = num, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, problem_id: str, total_frames: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(str(problem_id).encode())])
        return segment_indices(total_frames, self.num, rng)

    def __call__(self, sample: Sample) -> Clip:
        total = probe(sample.path)[0]
        if total < self.num:
            return read_frames(sample.path, num_frames=self.num)
        return read_frames(sample.path, indices=self.indices(sample.problem_id, total))


def read_image(path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB; unreadable files raise VideoError like videos do."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as e:
        raise VideoError(f"{path}: missing file") from e
    except (UnidentifiedImageError, OSError) as e:
        raise VideoError(f"{path}: cannot read image ({e})") from e


def load_visual(sample: Sample, select: Selector) -> Clip | np.ndarray:
    """The sample's visual input: selected frames of a video, or the image itself."""
    return select(sample) if sample.data_type == "video" else read_image(sample.path)


def load_batch(samples: list[Sample], select: Selector, on_bad_video: str, skipped_path, **context):
    """Visual inputs of a training batch. An unreadable video is recorded in `skipped_path` (with
    `context`, e.g. the step) and left out, or raises when on_bad_video == "stop"; it is never
    replaced by another sample's data. Returns (the samples kept, their visuals)."""
    from common.jsonl import append_jsonl

    kept, visuals = [], []
    for sample in samples:
        try:
            visuals.append(load_visual(sample, select))
            kept.append(sample)
        except VideoError as e:
            if on_bad_video == "stop":
                raise
            append_jsonl(skipped_path, [{**context, "problem_id": sample.problem_id, "error": str(e)}])
    return kept, visuals
