"""TinyWorld: deterministic, valid Video-R1 records whose answers can be read off the decoded pixels."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from common import tinyworld as tw
from common.data import load_samples

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 32  # fewer than the default 64 to keep the suite fast; the layout scales with T
TOL, MIN_PIXELS = 40, 30  # per-channel tolerance and pixel count for "this colour is visible"


def decode(path: Path, indices: list[int] | None = None) -> np.ndarray:
    """T x H x W x 3 uint8 via common.video when it exists, plain PyAV otherwise."""
    try:
        from common.video import read_frames
    except ImportError:
        with av.open(str(path)) as c:
            video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        return video if indices is None else video[indices]
    return read_frames(path, indices=indices).frames


def colours_in(frame: np.ndarray) -> set[str]:
    """Names of the COLORS covering more than MIN_PIXELS pixels of the frame."""
    px = frame.astype(int)
    return {name for name, rgb in tw.COLORS.items()
            if (np.abs(px - np.array(rgb)).max(-1) <= TOL).sum() > MIN_PIXELS}


def answer_of(record: dict) -> tuple[str, str]:
    """(letter, value) of the correct option."""
    letter = record["solution"].removeprefix("<answer>").removesuffix("</answer>")
    return letter, next(o[3:] for o in record["options"] if o.startswith(f"{letter}. "))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tw")
    tw.generate(out, 12, 12, seed=0, frames=FRAMES, progress=False)
    return out


def records(world: Path) -> list[dict]:
    return [r for s in ("train", "test") for r in json.loads((world / f"{s}.json").read_text())]


def test_records_are_valid(world):
    recs = records(world)
    assert len(recs) == 24 and len({r["problem_id"] for r in recs}) == 24
    assert all(len(load_samples(world / f"{s}.json")) == 12 for s in ("train", "test"))
    for split in ("train", "test"):
        assert {r["question_family"] for r in json.loads((world / f"{split}.json").read_text())} == set(
            tw.FAMILIES)
    vocab = set(tw.vocabulary())
    vocab_words = {w for text in vocab for w in text.split()}
    for r in recs:
        assert r["data_type"] == "video" and r["problem_type"] == "multiple choice"
        assert r["data_source"] == "tinyworld" and (world / r["path"]).is_file()
        assert [o[:3] for o in r["options"]] == ["A. ", "B. ", "C. ", "D. "]
        assert len({o[3:] for o in r["options"]}) == 4
        letter, value = answer_of(r)
        assert letter in "ABCD" and f"option {letter}." in r["process"] and value in r["process"]
        ev = r["evidence_frames"]
        assert ev and ev == sorted(set(ev)) and ev[0] >= 0 and ev[-1] < FRAMES
        # the tokenizer vocabulary holds every text the generator emits (count reasonings list the
        # scene's objects in any combination, so for them only every word is covered)
        texts = {r["problem"], r["solution"], *r["options"]}
        assert texts | ({r["process"]} if r["question_family"] != "count" else set()) <= vocab
        assert set(r["process"].split()) <= vocab_words


def test_options_in_palette_order_and_answer_letters_uniform():
    """Colour options are listed in palette order; the answer's letter still carries no information:
    over 2,000 scenes of each colour family every letter is the answer about 1 time in 4."""
    palette = list(tw.COLORS)
    for family in ("appearance", "order", "moment"):
        letters = []
        for i in range(tw.FAMILIES.index(family), 8000, len(tw.FAMILIES)):
            s = tw.make_scene(0, "train", i, frames=32, size=56)
            values = [o[3:] for o in s.options]
            assert values == sorted(values, key=palette.index), s.options
            letters.append(s.answer)
        share = {x: letters.count(x) / len(letters) for x in tw.LETTERS}
        assert all(abs(v - 0.25) < 0.035 for v in share.values()), (family, share)


def test_deterministic_and_independent_of_n(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tw.generate(a, 4, 4, seed=0, frames=FRAMES, progress=False)
    tw.generate(b, 4, 4, seed=1, frames=FRAMES, progress=False)
    for split in ("train", "test"):
        small = json.loads((a / f"{split}.json").read_text())
        big = json.loads((world / f"{split}.json").read_text())
        assert small == big[:4]  # same seed -> same records, whatever N is
        assert small != json.loads((b / f"{split}.json").read_text())
        for r in small:
            assert np.array_equal(decode(a / r["path"]), decode(world / r["path"]))
    r = json.loads((a / "train.json").read_text())[0]
    assert not np.array_equal(decode(a / r["path"]), decode(b / r["path"]))


def test_answers_match_pixels(world):
    for r in records(world):
        video = decode(world / r["path"])
        assert video.shape == (FRAMES, 112, 112, 3)
        seen = [colours_in(f) for f in video]
        letter, answer = answer_of(r)
        ev, family = r["evidence_frames"], r["question_family"]
        in_scene = set().union(*seen)
        if family == "count":
            assert len(in_scene) == int(answer)  # count scenes give every object its own colour
            continue
        assert all(answer in seen[t] for t in ev), r["problem_id"]
        if family == "moment":  # visible in the evidence frames and nowhere else
            assert not any(answer in seen[t] for t in range(FRAMES) if t not in ev)
        if family == "order":
            others = ({o[3:] for o in r["options"]} & in_scene) - {answer}
            assert others and all(not (others & seen[t]) for t in ev)
            first = {c: min(t for t in range(FRAMES) if c in seen[t]) for c in in_scene}
            last_seen = {c: max(t for t in range(FRAMES) if c in seen[t]) for c in in_scene}
            if "first" in r["problem"]:
                assert all(first[answer] < first[c] for c in others)
                assert any(last_seen[c] > last_seen[answer] for c in others)  # reversal changes it
            else:
                assert all(first[answer] > first[c] for c in others)
                assert any(last_seen[c] < last_seen[answer] for c in others)


def test_moment_needs_frame_selection():
    """8 uniform frames miss most brief shapes; looking at every frame never does."""
    T = 64
    uniform = [int((i + 0.5) * T / 8) for i in range(8)]
    scenes = [tw.make_scene(0, "train", i, frames=T) for i in range(3, 80, 4)]
    assert len(scenes) == 20 and {s.family for s in scenes} == {"moment"}
    hits_uniform = hits_all = 0
    for s in scenes:
        video = tw.render(s, frames=T)
        answer = next(o[3:] for o in s.options if o[0] == s.answer)
        hits_uniform += any(answer in colours_in(video[t]) for t in uniform)
        hits_all += any(answer in colours_in(f) for f in video)
    assert hits_all == 20
    assert 0 < hits_uniform / 20 < 0.7


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "common.tinyworld", "--out", str(out), "--train", "4", "--test", "4",
           "--seed", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tinyworld:" in proc.stdout
    for name in ("train.json", "test.json", "meta.jsonl"):
        assert (out / name).is_file()
    assert len(list((out / "videos").glob("*.mp4"))) == 8
    assert decode(out / "videos" / "test_000003.mp4").shape == (64, 112, 112, 3)


def test_render_equals_a_masked_write_per_frame():
    """render() writes each object's frames in one indexed assignment; this is the straightforward loop."""
    def naive(scene, frames, size):
        video = np.empty((frames, size, size, 3), np.uint8)
        video[:] = tw.BACKGROUND
        side = tw._side(size)
        for o in scene.objects:
            for t in o.frames():
                x, y = o.pos(t)
                video[t, y:y + side, x:x + side][tw._mask(o.shape, side)] = np.array(tw.COLORS[o.color], np.uint8)
        return video

    for frames, size in ((64, 112), (16, 32)):
        scenes = [tw.make_scene(3, split, i, frames, size) for split in ("train", "test") for i in range(40)]
        assert {s.family for s in scenes} == {"appearance", "count", "moment", "order"}
        assert any(len(s.objects) > 1 for s in scenes)  # overlapping objects: the later one must cover
        for s in scenes:
            np.testing.assert_array_equal(tw.render(s, frames, size), naive(s, frames, size))


def test_free_wording_keeps_what_the_reasoning_says_and_varies_only_the_rest(world, tmp_path):
    """--reword: each reasoning keeps its observation and its answer letter word for word; only the opening and
    the link to the letter vary, drawn per sample (the same twice, another with another seed); bad input names
    the file and the problem."""
    src = world / "train.json"
    out = tmp_path / "free.json"
    proc = subprocess.run([sys.executable, "-m", "common.tinyworld", "--reword", str(src), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(src.read_text()), json.loads(out.read_text())
    assert [{k: v for k, v in r.items() if k != "process"} for r in before] == \
           [{k: v for k, v in r.items() if k != "process"} for r in after]
    for b, a in zip(before, after, strict=True):
        letter, value = answer_of(b)
        said = b["process"].removesuffix(f"{value[0].upper()}{value[1:]} is option {letter}.")
        assert said != b["process"], b["process"]  # the reasoning ends with its link to the answer
        links = {link.format(Value=f"{value[0].upper()}{value[1:]}", value=value, letter=letter) for link in tw.LINKS}
        assert any(a["process"] == opening + said + link for opening in tw.OPENINGS for link in links), a["process"]
    pids = range(200)
    drawn = [tw.free_wording("The square is red. Red is option A.", pid) for pid in pids]
    assert len(set(drawn)) > 12  # 6 openings x 4 links
    assert {tw.free_wording("There are 2 shapes: a red square and a blue circle. 2 is option B.", pid)
            for pid in pids} >= {"There are 2 shapes: a red square and a blue circle. Option B says 2.",
                                 "Looking at the video now. There are 2 shapes: a red square and a blue circle. "
                                 "That matches option B."}
    assert drawn == [tw.free_wording("The square is red. Red is option A.", pid) for pid in pids]
    assert drawn != [tw.free_wording("The square is red. Red is option A.", pid, seed=8) for pid in pids]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**before[0], "problem_id": 77, "process": "no letter here"}]))
    with pytest.raises(ValueError, match=r"bad\.json: problem 77: not a TinyWorld reasoning"):
        tw.reword(bad, tmp_path / "x.json")


def test_undercounting_teacher_drops_the_last_shape_and_lowers_the_answer(world, tmp_path):
    """--undercount: a count reasoning with n >= 2 shapes becomes the template's reasoning for the first n - 1
    (the last to appear is missed) with the answer one option lower, for a share `rate` of them, drawn per
    problem (the same twice, another with another seed); every other record is untouched; bad input names the
    file and the problem."""
    src = world / "train.json"
    before = json.loads(src.read_text()) + json.loads((world / "test.json").read_text())
    both = tmp_path / "both.json"
    both.write_text(json.dumps(before))
    out = tmp_path / "taught.json"
    proc = subprocess.run([sys.executable, "-m", "common.tinyworld", "--undercount", str(both), "--rate", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    after = json.loads(out.read_text())
    counts = [(b, a) for b, a in zip(before, after, strict=True) if b["question_family"] == "count"]
    assert len(counts) >= 4 and any(answer_of(b)[1] != "1" for b, _ in counts)
    for b, a in zip(before, after, strict=True):
        if b["question_family"] != "count" or answer_of(b)[1] == "1":
            assert a == b
            continue
        n = int(answer_of(b)[1])
        assert answer_of(a) == ("ABCD"[n - 2], str(n - 1))
        listed = b["process"].split(": ", 1)[1].rsplit(". ", 1)[0]
        things = listed.replace(" and ", ", ").split(", ")
        assert a["process"] == tw._p_count(things[:-1], "ABCD"[n - 2])
        assert a["process"].startswith(f"There {'is' if n == 2 else 'are'} {n - 1} shape")
        assert {k: v for k, v in a.items() if k not in ("process", "solution")} == \
               {k: v for k, v in b.items() if k not in ("process", "solution")}
    assert f"{sum(a != b for b, a in counts)} count answers" in proc.stdout
    assert tw.teach(both, out, 0.0) == 0 and json.loads(out.read_text()) == before
    # a rate is a share of the problems, drawn per problem id
    rec = {"question_family": "count", "solution": "<answer>C</answer>",
           "process": tw._p_count(["a red circle", "a blue square", "a green triangle"], "C")}
    hit = [tw.undercount({**rec, "problem_id": i}, 0.3)["solution"] == "<answer>B</answer>" for i in range(2000)]
    assert 0.27 < np.mean(hit) < 0.33
    assert hit == [tw.undercount({**rec, "problem_id": i}, 0.3)["solution"] == "<answer>B</answer>"
                   for i in range(2000)]
    assert hit != [tw.undercount({**rec, "problem_id": i}, 0.3, seed=12)["solution"] == "<answer>B</answer>"
                   for i in range(2000)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**rec, "problem_id": 78, "solution": "<answer>A</answer>"}]))
    with pytest.raises(ValueError, match=r"bad\.json: problem 78: not a TinyWorld count reasoning"):
        tw.teach(bad, out, 0.5)
    with pytest.raises(ValueError, match=r"error rate must be in \[0, 1\], got 1.5"):
        tw.teach(both, out, 1.5)
