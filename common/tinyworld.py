"""TinyWorld: a synthetic video QA world, the embedded default dataset (no downloads needed).

Each sample is a short H.264 mp4 of solid coloured shapes on a dark background that appear, move
linearly and disappear, plus one Video-R1-format multiple-choice question about it. Four families
probe different abilities, so a pipeline can be checked end to end on data whose answers are known:

- appearance: "What colour is the circle?" -- needs to see and bind shape to colour.
- order:      "Which colour appears first/last?" -- needs frame order (reversal changes the answer).
- count:      "How many shapes appear?" -- shapes come and go, so one frame is rarely enough.
- moment:     a shape visible for only a few frames -- sparse uniform sampling usually misses it,
              which is what makes frame selection matter.

Every record carries `evidence_frames` (frame numbers where the answer can be seen) and a short
reference `process` that states the observation and links it to the option letter. Colour options
are listed in a fixed palette order (count lists 1-4), which keeps the answer letter uniform but
makes finding it learnable for a tiny model (see `_choices`). Output is
deterministic for a seed: each sample draws from its own Generator seeded by (seed, split, index),
so a sample does not depend on how many others are generated, and x264 runs single-threaded.

    python -m common.tinyworld --out data/tinyworld --train 2000 --test 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from functools import cache
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

# Saturated, mutually distant colours: after yuv420p at crf 14 the interior of every shape stays
# within 40 of its RGB value on every channel, and no colour comes within 40 of another.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (240, 240, 240), "magenta": (220, 50, 220), "cyan": (40, 220, 230), "orange": (250, 140, 20),
}
SHAPES = ("square", "circle", "triangle")
FAMILIES = ("appearance", "order", "count", "moment")
BACKGROUND = (20, 20, 20)
LETTERS = "ABCD"
SPLITS = {"train": 0, "test": 1}  # seeds the per-sample Generator
ID_OFFSET = {"train": 0, "test": 1_000_000}  # problem ids are unique across splits
BANDS = 4  # horizontal bands, one object each, so objects never overlap
CRF = "14"


@dataclass
class Obj:
    """One shape: visible for frames start..end-1, top-left corner moving linearly (x0,y0)->(x1,y1)."""
    color: str
    shape: str
    start: int
    end: int
    x0: float
    y0: float
    x1: float
    y1: float

    def frames(self) -> range:
        return range(self.start, self.end)

    def pos(self, t: int) -> tuple[int, int]:
        f = (t - self.start) / max(1, self.end - self.start - 1)
        return round(self.x0 + f * (self.x1 - self.x0)), round(self.y0 + f * (self.y1 - self.y0))


@dataclass
class Scene:
    """A sample before rendering: the objects and the question with its answer and evidence."""
    family: str
    objects: list[Obj]
    problem: str
    options: list[str]
    answer: str  # option letter
    evidence: list[int]
    process: str


# --- text templates; vocabulary() enumerates the same functions so the two never drift apart ---

def _a(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def _link(value: str, letter: str) -> str:
    return f"{value[0].upper()}{value[1:]} is option {letter}."


def _q_appearance(shape: str) -> str:
    return f"What colour is the {shape}?"


def _p_appearance(color: str, shape: str, letter: str) -> str:
    return f"The {shape} is {color}. {_link(color, letter)}"


def _q_order(which: str) -> str:
    return f"Which colour appears {which} in the video?"


def _p_order(color: str, which: str, letter: str) -> str:
    if which == "first":
        seen = f"The {color} shape is visible before any other shape appears"
    else:
        seen = f"The {color} shape appears after the others and is still there once they are gone"
    return f"{seen}, so {color} appears {which}. {_link(color, letter)}"


Q_COUNT = "How many shapes appear in the video?"


def _p_count(things: list[str], letter: str) -> str:
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    n = len(things)
    return f"There {'is' if n == 1 else 'are'} {n} shape{'s' * (n > 1)}: {listed}. {_link(str(n), letter)}"


def _q_moment(shape: str | None) -> str:
    if shape is None:
        return "What colour was the shape that appeared only briefly?"
    return f"What colour was the {shape} that flashed up for a moment?"


def _p_moment(color: str, shape: str, letter: str) -> str:
    return (f"{_a(color, shape).capitalize()} shows up for only a moment while the other shapes stay, "
            f"so the brief shape is {color}. {_link(color, letter)}")


# --- scene construction ---

def _place(rng: np.random.Generator, color: str, shape: str, start: int, end: int, band: int,
           size: int) -> Obj:
    """Random linear path inside `band` that stays in the frame for the whole visible span."""
    side, band_h = _side(size), size // BANDS
    room_x, slack_y = size - side, band_h - side
    dist = min(rng.uniform(0.5, 3.0) * max(1, end - start - 1), room_x)  # 0.5-3 px per frame
    x0 = rng.uniform(0, room_x - dist)
    x0, x1 = (x0, x0 + dist) if rng.random() < 0.5 else (x0 + dist, x0)
    y0, y1 = band * band_h + rng.uniform(0, slack_y, size=2)
    return Obj(color, shape, int(start), int(end), float(x0), float(y0), float(x1), float(y1))


def _side(size: int) -> int:
    return min(round(0.2 * size), size // BANDS)


def _choices(rng: np.random.Generator, answer: str, must: list[str],
             pool: list[str]) -> tuple[list[str], str]:
    """Answer + distractors (`must` first, then random from `pool`), listed in palette order (as count
    lists 1-4 in order); returns (options, letter). Answer and distractors are exchangeable random
    colours, so the answer's letter is still uniform over A-D and a blind guess still scores 1 in 4.
    Shuffled letters turn each answer into an in-context lookup that the 2-layer tiny model needed
    ~4,000 text-only steps to learn (README, "Can the tiny model learn?"); in palette order, ~500."""
    distract = [c for c in must if c != answer][:3]
    rest = [c for c in pool if c != answer and c not in distract]
    distract += [str(c) for c in rng.choice(rest, 3 - len(distract), replace=False)]
    values = sorted([answer, *distract], key=list(COLORS).index)
    return [f"{LETTERS[i]}. {v}" for i, v in enumerate(values)], LETTERS[values.index(answer)]


def make_scene(seed: int, split: str, index: int, frames: int = 64, size: int = 112) -> Scene:
    """The scene of sample `index` of `split`; depends only on these arguments, never on N."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    family = FAMILIES[index % len(FAMILIES)]  # round-robin keeps families balanced in any prefix
    T, names = frames, list(COLORS)
    bands = [int(b) for b in rng.permutation(BANDS)]
    span = lambda lo, hi: int(rng.integers(lo, hi + 1))  # inclusive

    if family == "appearance":
        n = span(2, 3)
        shapes, colors = rng.permutation(SHAPES)[:n], rng.choice(names, n, replace=False)
        objs = []
        for i in range(n):  # the asked-about object (i == 0) is visible for most of the video
            start = span(0, T // 5) if i == 0 else span(0, T // 2)
            end = span(T - T // 5, T) if i == 0 else span(start + T // 4, T)
            objs.append(_place(rng, str(colors[i]), str(shapes[i]), start, end, bands[i], size))
        target = objs[0]
        options, letter = _choices(rng, target.color, [o.color for o in objs[1:]], names)
        return Scene(family, objs, _q_appearance(target.shape), options, letter, list(target.frames()),
                     _p_appearance(target.color, target.shape, letter))

    if family == "order":
        # Objects appear one after another and leave in the same order with equal lifetimes, so the
        # first one is alone at the start and the last one alone at the end: reversal swaps them.
        n = span(2, 3)
        colors = rng.choice(names, n, replace=False)
        starts = [span(0, T // 10)]
        for _ in range(n - 1):
            starts.append(starts[-1] + span(max(1, T // 8), max(1, T // 5)))
        d_max = T - starts[-1]
        life = span(min(starts[-1] - starts[0] + max(1, T // 8), d_max), d_max)
        objs = [_place(rng, str(colors[i]), str(rng.choice(SHAPES)), s, s + life, bands[i], size)
                for i, s in enumerate(starts)]
        which = "first" if rng.random() < 0.5 else "last"
        target = objs[0] if which == "first" else objs[-1]
        # evidence: frames where the answer is visible and no other shape is (yet / any more)
        alone = (starts[0], starts[1]) if which == "first" else (objs[-2].end, objs[-1].end)
        evidence = list(range(*alone))
        options, letter = _choices(rng, target.color, [o.color for o in objs if o is not target], names)
        return Scene(family, objs, _q_order(which), options, letter, evidence,
                     _p_order(target.color, which, letter))

    if family == "count":
        n = span(1, 4)
        colors = rng.choice(names, n, replace=False)  # distinct colours make the count checkable
        objs = []
        for i in range(n):  # at least T/4 frames each, so 8 uniform frames see every object
            start = span(0, T // 2)
            objs.append(_place(rng, str(colors[i]), str(rng.choice(SHAPES)), start, span(start + T // 4, T),
                               bands[i], size))
        objs.sort(key=lambda o: o.start)
        options, letter = [f"{LETTERS[k]}. {k + 1}" for k in range(4)], LETTERS[n - 1]
        # evidence: every frame showing at least one shape; no single frame has to show them all
        evidence = sorted(set().union(*(o.frames() for o in objs)))
        return Scene(family, objs, Q_COUNT, options, letter, evidence,
                     _p_count([_a(o.color, o.shape) for o in objs], letter))

    # moment: 1-2 long-lived distractors plus one shape visible for ~T/32..T/16 consecutive frames
    n = span(1, 2)
    shapes, colors = rng.permutation(SHAPES)[:n + 1], rng.choice(names, n + 1, replace=False)
    objs = [_place(rng, str(colors[i]), str(shapes[i]), span(0, T // 10), span(T - T // 10, T),
                   bands[i], size) for i in range(n)]
    length = span(max(1, T // 32), max(2, T // 16))
    start = span(T // 8, T - T // 8 - length)
    brief = _place(rng, str(colors[n]), str(shapes[n]), start, start + length, bands[n], size)
    # distractors avoid the scene's colours: missing the flash leaves a 1-in-4 guess, not 1-in-2
    pool = [c for c in names if c not in colors]
    options, letter = _choices(rng, brief.color, [], pool)
    problem = _q_moment(brief.shape if rng.random() < 0.5 else None)
    return Scene(family, [*objs, brief], problem, options, letter, list(brief.frames()),
                 _p_moment(brief.color, brief.shape, letter))


# --- rendering and encoding ---

@cache
def _mask(shape: str, side: int) -> np.ndarray:
    r, c = np.mgrid[0:side, 0:side]
    mid = (side - 1) / 2
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        return (r - mid) ** 2 + (c - mid) ** 2 <= (side / 2) ** 2
    return np.abs(c - mid) <= (r + 1) / 2  # triangle pointing up, base on the bottom row


def render(scene: Scene, frames: int = 64, size: int = 112) -> np.ndarray:
    """T x H x W x 3 uint8 RGB; hard edges (no anti-aliasing) keep shape colours pure."""
    video = np.empty((frames, size, size, 3), np.uint8)
    video[0] = BACKGROUND
    video[1:] = video[0]  # frame by frame: 40x faster than broadcasting the 3 channels over the whole video
    side = _side(size)
    for o in scene.objects:  # in order: a later object covers an earlier one
        ys, xs = np.nonzero(_mask(o.shape, side))  # the shape's pixels, relative to its top-left corner
        ts = np.array(o.frames())
        if len(ts) == 0:
            continue
        corners = np.array([o.pos(t) for t in ts])  # (frames, 2): x, y of the top-left corner per frame
        # every frame of the object in one indexed write (= a masked write per frame; tests/test_tinyworld.py)
        video[ts[:, None], corners[:, 1:] + ys, corners[:, :1] + xs] = COLORS[o.color]
    return video


def encode(path: str | Path, video: np.ndarray, fps: int = 8) -> None:
    """H.264 yuv420p mp4 whose bytes depend only on the pixels (single-threaded x264, no mbtree)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        # mbtree off: with it, x264 (single-threaded) gave a different stream for about 1 video in
        # 100 from one run to the next when other processes were running (measured; 0 of 400
        # pooled re-encodings differed without it).
        stream.options = {"crf": CRF, "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _build(task: tuple) -> tuple[dict, dict]:
    """Worker: scene -> mp4 on disk -> (Video-R1 record, scene metadata)."""
    out_dir, split, index, seed, frames, size, fps = task
    scene = make_scene(seed, split, index, frames, size)
    rel = f"videos/{split}_{index:06d}.mp4"
    encode(Path(out_dir) / rel, render(scene, frames, size), fps)
    pid = ID_OFFSET[split] + index
    record = {
        "problem_id": pid, "problem": scene.problem, "data_type": "video", "problem_type": "multiple choice",
        "options": scene.options, "solution": f"<answer>{scene.answer}</answer>", "path": rel,
        "data_source": "tinyworld", "question_family": scene.family, "evidence_frames": scene.evidence,
        "process": scene.process,
    }
    meta = {"problem_id": pid, "split": split, "family": scene.family,
            "objects": [asdict(o) for o in scene.objects]}
    return record, meta


def generate(out_dir: str | Path, n_train: int, n_test: int, seed: int, frames: int = 64, size: int = 112,
             fps: int = 8, workers: int = 2, progress: bool = True) -> dict:
    """Write DIR/videos/*.mp4, DIR/train.json, DIR/test.json and DIR/meta.jsonl (object tracks)."""
    if size % 2 or size < 32 or frames < 16:
        raise ValueError(f"need an even size >= 32 and frames >= 16, got size={size} frames={frames}")
    t0 = time.time()
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), split, i, seed, frames, size, fps)
             for split, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    bar = dict(total=len(tasks), desc="tinyworld", unit="video", disable=not progress)
    if workers > 1 and len(tasks) >= 64:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_build, tasks, chunksize=16), **bar))
    else:
        results = [_build(t) for t in tqdm(tasks, **bar)]
    paths = {"train": out / "train.json", "test": out / "test.json", "meta": out / "meta.jsonl"}
    for split in ("train", "test"):
        records = [r for (r, m) in results if m["split"] == split]
        paths[split].write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    paths["meta"].write_text("".join(json.dumps(m) + "\n" for _, m in results), encoding="utf-8")
    nbytes = sum(p.stat().st_size for p in (out / "videos").glob("*.mp4"))
    return {**{k: str(v) for k, v in paths.items()}, "videos": str(out / "videos"), "n_train": n_train,
            "n_test": n_test, "seconds": round(time.time() - t0, 2), "video_bytes": nbytes}


def vocabulary() -> list[str]:
    """Every question, option, reasoning and answer string the generator can emit (for tokenizers)."""
    names, out = list(COLORS), [Q_COUNT, _q_moment(None)]
    out += [_q_appearance(s) for s in SHAPES] + [_q_moment(s) for s in SHAPES]
    out += [_q_order(w) for w in ("first", "last")]
    for letter in LETTERS:
        out += [f"<answer>{letter}</answer>"] + [f"{letter}. {v}" for v in names + ["1", "2", "3", "4"]]
        for c in names:
            out += [_p_order(c, w, letter) for w in ("first", "last")]
            out += [_p_appearance(c, s, letter) for s in SHAPES] + [_p_moment(c, s, letter) for s in SHAPES]
    things = [_a(c, s) for c in names for s in SHAPES]
    for n in range(1, 5):  # every description, in count reasonings of every length
        out += [_p_count(things[i:i + n], LETTERS[n - 1]) for i in range(0, len(things) - n + 1, n)]
    return list(dict.fromkeys(out))


# --- free wording (an ablation of the SFT reasoning, never the default) ---

# Sentences that do not depend on the video: an opening (one way of six is none) and the link to the letter.
OPENINGS = ("", "Let me watch the video. ", "I look at each frame. ", "Watching the clip closely. ",
            "I check the frames in order. ", "Looking at the video now. ")
LINKS = ("{Value} is option {letter}.", "That matches option {letter}.", "So the answer is option {letter}.",
         "Option {letter} says {value}.")


def free_wording(process: str, problem_id: int, seed: int = 7) -> str:
    """`process` with an opening sentence and a link to the option letter drawn per sample (from OPENINGS and
    LINKS, by (seed, problem_id)); what it says about the video is kept word for word. The words a model
    writes then vary where the video says nothing: tokens that are uncertain but carry no evidence, as in a
    real model's free-form reasoning (README, "Where GRPO's gradient already is")."""
    m = re.fullmatch(r"(.*?)(\S+) is option ([A-D])\.", process, flags=re.S)
    if m is None:
        raise ValueError(f"problem {problem_id}: not a TinyWorld reasoning (no 'X is option L.' at its end): "
                         f"{process!r}")
    said, value, letter = m.groups()
    rng = np.random.default_rng([seed, int(problem_id)])
    link = LINKS[rng.integers(len(LINKS))]
    opening = OPENINGS[rng.integers(len(OPENINGS))]
    return opening + said + link.format(Value=value, value=value[0].lower() + value[1:], letter=letter)


def _rewrite(src: str | Path, dst: str | Path, fn) -> tuple[list[dict], list[dict]]:
    """Write the Video-R1 JSON list `src` to `dst` with each record replaced by `fn(record)` (media paths are
    kept, so `dst` goes next to `src`); a ValueError from `fn` names `src`. Returns (records, rewritten)."""
    records = json.loads(Path(src).read_text(encoding="utf-8"))
    out = []
    for r in records:
        try:
            out.append(fn(r))
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
    Path(dst).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return records, out


def reword(src: str | Path, dst: str | Path, seed: int = 7) -> int:
    """Write the Video-R1 JSON list `src` to `dst` with every `process` in free wording. Returns the number of
    records."""
    records, _ = _rewrite(src, dst, lambda r: {**r, "process": free_wording(r["process"], r["problem_id"], seed)})
    return len(records)


# --- a teacher that undercounts (an ablation of the SFT data, never the default) ---

_COUNT = re.compile(r"There (?:is|are) (\d) shapes?: (.*)\. (\d) is option ([A-D])\.")


def undercount(record: dict, rate: float, seed: int = 11) -> dict:
    """`record` as a teacher that misses the last shape to appear would have written it: in a count question
    with two or more shapes, with probability `rate` (drawn by (seed, problem_id)), the reasoning lists every
    shape but the last and the answer is one fewer. Any other record, and a count the teacher gets right,
    is returned as it is. SFT on such traces learns the teacher's bias; RL's reward knows the true count
    (README, "An imperfect teacher")."""
    if record.get("question_family") != "count":
        return record
    m = _COUNT.fullmatch(record.get("process") or "")
    if m is None or m.group(1) != m.group(3) or m.group(4) != LETTERS[int(m.group(1)) - 1] or \
            record.get("solution") != f"<answer>{m.group(4)}</answer>":
        raise ValueError(f"problem {record.get('problem_id')}: not a TinyWorld count reasoning and answer: "
                         f"{record.get('process')!r}, {record.get('solution')!r}")
    things = re.split(r", | and ", m.group(2))
    if len(things) != int(m.group(1)):
        raise ValueError(f"problem {record.get('problem_id')}: lists {len(things)} shapes but says {m.group(1)}")
    if len(things) < 2 or np.random.default_rng([seed, int(record["problem_id"])]).random() >= rate:
        return record
    letter = LETTERS[len(things) - 2]
    return {**record, "process": _p_count(things[:-1], letter), "solution": f"<answer>{letter}</answer>"}


def teach(src: str | Path, dst: str | Path, rate: float, seed: int = 11) -> int:
    """Write the Video-R1 JSON list `src` to `dst` with every record passed through `undercount`. Returns the
    number of records changed."""
    if not 0 <= rate <= 1:
        raise ValueError(f"the teacher's error rate must be in [0, 1], got {rate}")
    records, out = _rewrite(src, dst, lambda r: undercount(r, rate, seed))
    return sum(a is not b for a, b in zip(records, out, strict=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reword", metavar="JSON", help="instead of generating: write JSON's records to --out with "
                    "their reasoning in free wording (free_wording)")
    ap.add_argument("--wording-seed", type=int, default=7, help="--reword: the seed of the wording drawn")
    ap.add_argument("--undercount", metavar="JSON", help="instead of generating: write JSON's records to --out as a "
                    "teacher that misses the last shape of a count question with probability --rate (undercount)")
    ap.add_argument("--rate", type=float, default=0.5, help="--undercount: the teacher's error rate")
    ap.add_argument("--teacher-seed", type=int, default=11, help="--undercount: the seed of the errors drawn")
    a = ap.parse_args(argv)
    if a.undercount:
        n = teach(a.undercount, a.out, a.rate, a.teacher_seed)
        print(f"tinyworld: {n} count answers of {a.undercount} one too low (rate {a.rate}) -> {a.out}")
        return
    if a.reword:
        n = reword(a.reword, a.out, a.wording_seed)
        print(f"tinyworld: {n} reasonings of {a.reword} in free wording -> {a.out}")
        return
    info = generate(a.out, a.train, a.test, a.seed, a.frames, a.size, a.fps, a.workers)
    print(f"tinyworld: {a.train} train + {a.test} test videos ({a.frames} frames, {a.size}px, {a.fps} fps) "
          f"-> {a.out} in {info['seconds']:.1f}s, {info['video_bytes'] / 1e6:.1f} MB of video")


if __name__ == "__main__":
    main()
