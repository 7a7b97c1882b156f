"""Append-only JSONL files that survive interruption: a stage writes whole lines, flushes them to
disk, and on restart reads back everything except a line cut off mid-write."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file ([] if it does not exist).

    A last line without its newline is what an interrupted write leaves behind: it is dropped
    (and cut off the file when `repair`, so appending continues from a clean end). A broken line
    anywhere else is corruption, not interruption, and raises ValueError naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for n, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append whole lines and force them to disk, so a crash loses at most what was not yet passed."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def merge_shards(out: Path, name: str, order: list[str]) -> list[dict]:
    """Fold the per-process files NAME.rank*.jsonl into NAME.jsonl, in data order, each sample
    (problem_id) once, written atomically; returns the rows. Safe to repeat after a crash."""
    shards = sorted(out.glob(f"{name}.rank*.jsonl"))
    by_id: dict[str, dict] = {}
    for path in [out / f"{name}.jsonl", *shards]:
        for row in read_jsonl(path):
            by_id.setdefault(row["problem_id"], row)
    rows = [by_id[i] for i in order if i in by_id]
    tmp = out / f"{name}.jsonl.tmp"
    tmp.write_text("")
    append_jsonl(tmp, rows)
    tmp.replace(out / f"{name}.jsonl")
    for path in shards:
        path.unlink()
    return rows


def drop_steps_after(path: str | Path, step: int) -> None:
    """Keep only the rows logged at or before `step`. A training run killed between two checkpoints
    resumes at the last one and logs the steps after it again; without this its log holds them twice.
    A fresh run (step 0) starts its log over. The file is replaced whole, so an interruption here
    leaves either the old or the new log."""
    path = Path(path)
    rows = read_jsonl(path, repair=True)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) == len(rows):
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
