"""Video-R1-format records: reading, validation, and the one prompt builder every stage uses.

A record (JSON list or JSONL, one object per sample):

    {"problem_id": 2, "problem": "...", "data_type": "video", "problem_type": "multiple choice",
     "options": ["A. ...", "B. ...", "C. ...", "D. ..."], "solution": "<answer>A</answer>",
     "path": "./videos/x.mp4", "data_source": "...", "process": "optional reference reasoning"}

Media paths resolve against a media root, by default the data file's own directory, so a
benchmark folder holding its JSON and its videos works as it is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
DATA_TYPES = ("video", "image")
REQUIRED_FIELDS = ("problem_id", "problem", "data_type", "problem_type", "solution", "path")


class DataError(ValueError):
    """A data file or one of its records is malformed; the message names the file and the record."""


@dataclass
class Sample:
    problem_id: str
    problem: str
    data_type: str
    problem_type: str
    solution: str
    path: Path  # resolved against the media root
    options: list[str] = field(default_factory=list)
    data_source: str = ""
    process: str | None = None
    question_family: str | None = None
    evidence_frames: list[int] | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw record, untouched


def _read_raw(path: Path) -> list[tuple[str, dict]]:
    """Returns (location, record) pairs; location is "record i" or "line n" for error messages."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: file is empty")
    if stripped[0] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        return [(f"record {i}", r) for i, r in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON: {e.msg}") from e
    return out


def load_samples(path: str | Path, media_root: str | Path | None = None) -> list[Sample]:
    """Read and validate a Video-R1-format file; raises DataError naming the file and record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    root = Path(media_root) if media_root else path.parent
    samples, seen = [], {}
    for where, raw in _read_raw(path):
        sample = _validate(raw, f"{path}: {where}", root)
        if sample.problem_id in seen:
            raise DataError(f"{path}: {where}: duplicate problem_id {sample.problem_id!r} "
                            f"(first at {seen[sample.problem_id]})")
        seen[sample.problem_id] = where
        samples.append(sample)
    return samples


def require_some_media(samples: list[Sample], path: str | Path) -> None:
    """Raise when not one of the samples' media files exists. A missing file is a broken video, which
    the stages record and skip; but when none exists, the paths or media_root are wrong, and a stage
    would run to the end on nothing. Stops at the first file found."""
    if samples and not any(s.path.exists() for s in samples):
        raise DataError(f"{path}: none of its {len(samples)} media files exists (the first: {samples[0].path}); "
                        f"relative paths resolve against the data file's folder, or media_root when set")


def _validate(raw: Any, where: str, root: Path) -> Sample:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    if raw["problem_type"] not in PROBLEM_TYPES:
        raise DataError(f"{where}: problem_type {raw['problem_type']!r} is not one of {list(PROBLEM_TYPES)}")
    if raw["data_type"] not in DATA_TYPES:
        raise DataError(f"{where}: data_type {raw['data_type']!r} is not one of {list(DATA_TYPES)}")
    for key in ("problem", "solution", "path"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
    options = raw.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: field 'options' must be a list of strings")
    if raw["problem_type"] == "multiple choice" and len(options) < 2:
        raise DataError(f"{where}: a multiple-choice record needs at least 2 options")
    evidence = raw.get("evidence_frames")
    if evidence is not None and not (isinstance(evidence, list) and all(isinstance(i, int) for i in evidence)):
        raise DataError(f"{where}: field 'evidence_frames' must be a list of frame numbers")
    return Sample(
        problem_id=str(raw["problem_id"]),
        problem=raw["problem"],
        data_type=raw["data_type"],
        problem_type=raw["problem_type"],
        solution=raw["solution"],
        path=(root / raw["path"]).resolve(),
        options=options,
        data_source=str(raw.get("data_source") or ""),
        process=raw.get("process"),
        question_family=raw.get("question_family"),
        evidence_frames=evidence,
        record=raw,
    )


# The instruction asks for reasoning then an answer in tags; the reward functions read the tags.
THINK_ANSWER_INSTRUCTION = (
    "First think about the question inside <think> </think>, "
    "then give the final answer inside <answer> </answer>."
)
ANSWER_FORMAT = {
    "multiple choice": "Answer with the option letter only.",
    "numerical": "Answer with a number, e.g. 42 or 3.14.",
    "OCR": "Answer with the text as written.",
    "free-form": "Answer in a short sentence.",
    "regression": "Answer with a number, e.g. 42 or 3.14.",
}


def build_prompt(sample: Sample) -> str:
    """Question + options + the think/answer instruction for the sample's problem type."""
    lines = [sample.problem.strip()]
    if sample.problem_type == "multiple choice":
        lines.append("Options:")
        lines.extend(o.strip() for o in sample.options)
    lines.append(f"{THINK_ANSWER_INSTRUCTION} {ANSWER_FORMAT[sample.problem_type]}")
    return "\n".join(lines)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def solution_answer(sample: Sample) -> str:
    """The bare answer inside the solution's <answer> tags (the solution itself if untagged)."""
    found = _ANSWER_TAG.findall(sample.solution)
    return (found[-1] if found else sample.solution).strip()


def build_target(sample: Sample, with_reasoning: bool = True) -> str:
    """Supervised target: `<think>process</think><answer>X</answer>` (answer only without a process)."""
    answer = f"<answer>{solution_answer(sample)}</answer>"
    if with_reasoning and sample.process:
        return f"<think>{sample.process.strip()}</think>{answer}"
    return answer


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's sample indices for each step of an epoch: a seeded shuffle, cut into global
    batches of batch_size * world, each dealt out by rank (an incomplete last batch is dropped).
    A pure function of (seed, epoch), so a resumed run sees exactly the batches it would have."""
    order = np.random.default_rng(seed + epoch).permutation(n)
    per_step = batch_size * world
    return [order[s + rank * batch_size: s + (rank + 1) * batch_size].tolist()
            for s in range(0, n - per_step + 1, per_step)]


def split_records(path: str | Path, n_first: int, first: str | Path, rest: str | Path) -> tuple[int, int]:
    """Write the first `n_first` records of a Video-R1 JSON list to `first` and the others to `rest`.
    A relative media path is rewritten relative to the folder of the file it goes to, so it names the
    same file wherever `first` and `rest` are written (unchanged when they sit next to `path`). The tiny
    default uses it for the paper's data shape: SFT with reasoning on a part, RL with answers on the rest."""
    path = Path(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    if not 0 < n_first < len(records):
        raise ValueError(f"{path}: cannot split {len(records)} records after the first {n_first}")
    for out, part in ((Path(first), records[:n_first]), (Path(rest), records[n_first:])):
        moved = [r if "path" not in r or Path(r["path"]).is_absolute() else
                 {**r, "path": os.path.relpath(path.parent / r["path"], out.parent)} for r in part]
        out.write_text(json.dumps(moved, indent=1) + "\n", encoding="utf-8")
    return n_first, len(records) - n_first


if __name__ == "__main__":  # python -m common.data split IN N FIRST REST
    import sys

    if len(sys.argv) != 6 or sys.argv[1] != "split":
        sys.exit("usage: python -m common.data split IN N FIRST REST")
    a, b = split_records(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    print(f"{sys.argv[2]}: {a} records -> {sys.argv[4]}, {b} -> {sys.argv[5]}")
