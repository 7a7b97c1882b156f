"""Video-R1 mix: a small dataset shaped like real Video-R1 data, for rehearsing the paper-scale path on CPU.

TinyWorld has one frame size, one frame rate and only multiple-choice questions. A real Video-R1 file
is mixed, and this dataset mixes the same things:
- H.264 mp4 videos of different sizes, frame rates and lengths, including a portrait one;
- PNG and JPEG images;
- every problem type the rewards score (multiple choice, numerical, OCR, free-form, regression), for
  videos and for images;
- one truncated mp4, which training must skip and record in skipped.jsonl.

Each item is a dark frame with solid coloured shapes moving across it, plus a word written below.
Images also have a partly filled bar. The answers are computed from the drawn scene, so they are correct.
Every item draws from its own Generator seeded by (seed, item), and the output is byte-identical for a
given seed.

    python -m common.videor1mix --out data/video_r1   # -> data/video_r1/train.json, configs/ktr.yaml's data
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.tinyworld import (
    BACKGROUND,
    COLORS,
    Q_COUNT,
    SHAPES,
    Obj,
    _a,
    _choices,
    _mask,
    _p_appearance,
    _p_order,
    _q_appearance,
    _q_order,
    encode,
)

# name, width, height, fps, seconds. The sizes are even because yuv420p needs that.
VIDEOS = (
    ("small", 64, 48, 8, 2.0),
    ("medium", 160, 120, 24, 3.0),
    ("large", 320, 240, 30, 1.5),
    ("portrait", 96, 160, 12, 2.5),
)
BROKEN = ("truncated", 160, 120, 24, 2.0)
TRUNCATE_AT = 0.4  # the part of the file's bytes that is kept: the moov atom at the end is lost
IMAGES = (("diagram", 128, 96, "png"), ("board", 300, 200, "jpeg"), ("poster", 120, 180, "jpeg"))
WORDS = ("KITE", "RIVER", "MANGO", "OCEAN", "TIGER", "PIANO", "CLOUD", "LEMON", "ROBOT", "MAPLE")
TEXT_RGB, BAR_RGB, FILL_RGB = (235, 235, 235), (90, 90, 90), (240, 220, 40)
SOURCE = "videor1mix"
FIELDS = ("problem_type", "problem", "options", "answer", "process")  # of a question


@dataclass
class Scene:
    width: int
    height: int
    frames: int  # 1 for an image
    fps: float
    bands: int  # horizontal bands: rows 0-2 hold shapes, then the bar (images only), then the word
    side: int  # shape size in pixels
    objects: list[Obj]
    word: str
    word_span: tuple[int, int]  # frames that show the word
    fill: int | None  # images: percent of the bar that is filled

    @property
    def band_h(self) -> int:
        return self.height // self.bands


def make_scene(rng: np.random.Generator, width: int, height: int, frames: int, fps: float) -> Scene:
    """2-3 shapes (1-3 on an image) with distinct colours and shapes, one per band. Their start frames are
    distinct, so "which appears first" has one answer. Each shape moves at least a quarter of the width,
    so its direction is clear."""
    image = frames == 1
    bands = 5 if image else 4
    band_h = height // bands
    side = max(6, min(band_h - 2, width // 4))
    n = int(rng.integers(1, 4)) if image else int(rng.integers(2, 4))
    colors, shapes = rng.choice(list(COLORS), n, replace=False), rng.permutation(SHAPES)[:n]
    rows = rng.permutation(3)[:n]
    starts = [0] * n if image else sorted(int(s) for s in rng.choice(frames // 2, n, replace=False))
    objs = []
    for color, shape, row, start in zip(colors, shapes, rows, starts, strict=True):
        end = frames if image else int(rng.integers(start + frames // 3, frames + 1))
        room = width - side
        dist = 0.0 if image else rng.uniform(0.5, 1.0) * room
        lo = rng.uniform(0, room - dist)
        x0, x1 = (lo, lo + dist) if rng.random() < 0.5 else (lo + dist, lo)
        y = row * band_h + rng.uniform(0, band_h - side)
        objs.append(Obj(str(color), str(shape), start, end, float(x0), float(y), float(x1), float(y)))
    first = int(rng.integers(0, frames // 3 + 1))
    span = (0, 1) if image else (first, first + frames // 2)
    fill = int(rng.integers(2, 19)) * 5 if image else None  # 10..90 percent
    return Scene(width, height, frames, fps, bands, side, objs, str(rng.choice(WORDS)), span, fill)


def _text_mask(word: str, width: int, height: int) -> np.ndarray:
    """Where `word` is written, drawn with Pillow's bundled font and thresholded so the edges are hard."""
    size = max(8, int(height * 0.8))
    font = ImageFont.load_default(size=size)
    while size > 8 and font.getlength(word) > width - 4:  # shrink to fit narrow frames (the portrait video)
        size -= 1
        font = ImageFont.load_default(size=size)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((2, 0), word, fill=255, font=font)
    return np.asarray(canvas) > 127


def render(scene: Scene) -> np.ndarray:
    """T x H x W x 3 uint8 RGB."""
    s, bh = scene, scene.band_h
    out = np.empty((s.frames, s.height, s.width, 3), np.uint8)
    out[:] = BACKGROUND
    for o in s.objects:
        mask, rgb = _mask(o.shape, s.side), np.array(COLORS[o.color], np.uint8)
        for t in o.frames():
            x, y = o.pos(t)
            out[t, y:y + s.side, x:x + s.side][mask] = rgb
    text = _text_mask(s.word, s.width, bh)
    y_text = (s.bands - 1) * bh
    out[s.word_span[0]:s.word_span[1], y_text:y_text + bh][:, text] = TEXT_RGB
    if s.fill is not None:
        y0, y1, x0, x1 = 3 * bh + 2, 4 * bh - 2, 2, s.width - 2
        out[:, y0:y1, x0:x1] = BAR_RGB
        out[:, y0:y1, x0:x0 + round((x1 - x0) * s.fill / 100)] = FILL_RGB
    return out


def _listed(objs: list[Obj]) -> str:
    things = [_a(o.color, o.shape) for o in objs]
    return things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]


def _mc(rng: np.random.Generator, answer: str, others: list[str]) -> tuple[list[str], str]:
    return _choices(rng, answer, others, list(COLORS))


def questions(rng: np.random.Generator, s: Scene) -> list[dict]:
    """The record fields (problem_type, problem, options, solution, process) asked about a scene."""
    kind = "image" if s.frames == 1 else "video"
    target = s.objects[int(rng.integers(len(s.objects)))]
    others = [o.color for o in s.objects if o is not target]
    options, letter = _mc(rng, target.color, others)
    n = len(s.objects)
    items = [
        ("multiple choice", _q_appearance(target.shape), options, letter,
         _p_appearance(target.color, target.shape, letter)),
        ("numerical", Q_COUNT.replace("video", kind), [], str(n),
         f"I can see {_listed(s.objects)}, so there {'is' if n == 1 else 'are'} {n}."),
        ("OCR", f"What word is written in the {kind}?", [], s.word, f"The text at the bottom reads {s.word}."),
    ]
    if kind == "image":
        described = f"The image shows {_listed(s.objects)}, a bar that is partly filled, and the word {s.word}."
        items += [
            ("free-form", "Describe the image in one sentence.", [], described,
             f"There {'is one shape' if n == 1 else f'are {n} shapes'}, a bar and the word {s.word}."),
            ("regression", "What percentage of the bar is filled?", [], str(s.fill),
             f"The yellow part covers about {s.fill}% of the bar's length."),
        ]
        return [dict(zip(FIELDS, q, strict=True)) for q in items]
    first = min(s.objects, key=lambda o: o.start)
    options, letter = _mc(rng, first.color, [o.color for o in s.objects if o is not first])
    seconds = round((target.end - target.start) / s.fps, 2)
    way = "left to right" if target.x1 > target.x0 else "right to left"
    items += [
        ("multiple choice", _q_order("first"), options, letter, _p_order(first.color, "first", letter)),
        ("free-form", f"Describe how the {target.color} {target.shape} moves.", [],
         f"The {target.color} {target.shape} moves from {way}.",
         f"The {target.shape} starts on the {way.split()[0]} and ends on the {way.split()[-1]}."),
        ("regression", f"For how many seconds is the {target.shape} visible?", [], f"{seconds:g}",
         f"It is visible for {target.end - target.start} frames at {s.fps:g} fps, about {seconds:g} seconds."),
    ]
    return [dict(zip(FIELDS, q, strict=True)) for q in items]


def write_video_r1_mix(out_dir: str | Path, seed: int = 0) -> Path:
    """Write OUT/videos/*.mp4, OUT/images/*.{png,jpg} and OUT/train.json (Video-R1 records, paths relative to
    the JSON). Returns the JSON path. The record of the truncated video stays in, as in real data."""
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def add(rng: np.random.Generator, scene: Scene, rel: str, data_type: str) -> None:
        for q in questions(rng, scene):
            records.append({
                "problem_id": len(records) + 1, "problem": q["problem"], "data_type": data_type,
                "problem_type": q["problem_type"], "options": q["options"],
                "solution": f"<answer>{q['answer']}</answer>", "path": rel, "data_source": SOURCE,
                "process": q["process"],
            })

    for i, (name, w, h, fps, seconds) in enumerate((*VIDEOS, BROKEN)):
        rng = np.random.default_rng([seed, 0, i])
        scene = make_scene(rng, w, h, round(fps * seconds), fps)
        rel = f"videos/{name}_{w}x{h}_{fps}fps.mp4"
        encode(out / rel, render(scene), fps)
        if i == len(VIDEOS):  # keep the first part only, like an interrupted download
            data = (out / rel).read_bytes()
            (out / rel).write_bytes(data[:int(len(data) * TRUNCATE_AT)])
        add(rng, scene, rel, "video")
    for i, (name, w, h, fmt) in enumerate(IMAGES):
        rng = np.random.default_rng([seed, 1, i])
        scene = make_scene(rng, w, h, 1, 1.0)
        rel = f"images/{name}_{w}x{h}.{'jpg' if fmt == 'jpeg' else fmt}"
        pixels = Image.fromarray(render(scene)[0])
        pixels.save(out / rel, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
        add(rng, scene, rel, "image")
    path = out / "train.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = write_video_r1_mix(a.out, a.seed)
    n = len(json.loads(path.read_text(encoding="utf-8")))
    print(f"videor1mix: {n} records, {len(VIDEOS) + 1} videos (1 truncated), {len(IMAGES)} images -> {path}")


if __name__ == "__main__":
    main()
