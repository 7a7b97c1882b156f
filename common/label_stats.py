"""Frame-Voyager label diagnostics: is there a ranking signal in labels.jsonl, and did the scorer learn it?

    python -m common.label_stats --labels outputs/tiny/labels/labels.jsonl --data outputs/tiny/data/train.json \
        [--meta outputs/tiny/data/meta.jsonl] [--voyager outputs/tiny/voyager [--fit [--model PATH]]]

label_frames.py gives each sample M candidate frames, K combinations of T of them and each
combination's answer loss under the label model. This prints, overall and per question family:

1. Labels vs evidence. A combination "has the evidence" when one of its frames is one of the question's
   `evidence_frames` (as eval.py's evidence recall counts a hit). With --meta (tinyworld's object
   tracks), a count question instead needs a frame of every object: its evidence_frames are every frame
   showing any shape, which nearly every combination hits.
   - cand: share of samples whose candidates can reach the evidence at all
   - rand / unif / best: P(evidence) for a random T of the M candidates, for T uniform frames of the
     video (eval's uniform), and for the combination with the lowest label loss
   - AUC: P(loss of a combination with evidence < loss of one without), per sample (both kinds
     present), averaged; 0.5 = the loss ignores the evidence, 1.0 = it separates perfectly
   - d/sd: (mean loss without - mean loss with evidence) / the sample's loss std
2. Pairs, as train_voyager.py builds them: every two combinations of a sample whose losses differ by
   more than `margin`.
   - gap: median |loss difference| of the pairs (nats), and in units of the sample's loss std
   - tie<x: share of pairs closer than x nats; tie<res: closer than the residual std of an additive
     per-frame fit (the part of the loss no "mean of frame rewards" scorer can represent)
   - contrast: share of pairs in which exactly one side has the evidence (the pairs evidence can order)
   - oracle: pair accuracy of a scorer that knows the evidence (score = evidence groups hit; ties 0.5)
   - additive: held-out pair accuracy of a ridge fit of the loss on frame indicators, per sample (2-fold
     over its combinations): the ceiling of the scorer's model class given perfect per-frame rewards
3. Scorer (--voyager DIR): its metrics.jsonl (train ranking loss vs ln 2 = chance, validation pair
   accuracy). With --fit, the heads are re-run on the backbone features of train_voyager.py's own split
   to give train vs validation pair accuracy per family (loads the backbone; about as long as the
   feature pass of train_voyager.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from common.jsonl import read_jsonl
from common.video import uniform_indices

ALL = "all"


# ---------------------------------------------------------------------------------------------
# Per sample
# ---------------------------------------------------------------------------------------------

def evidence_groups(record: dict, objects: list[dict] | None = None) -> list[set[int]]:
    """Frame sets that a combination must each hit to have the evidence ([] = no evidence recorded).

    A count question with its object tracks needs every object; otherwise one set, the evidence_frames."""
    if objects and record.get("question_family") == "count":
        return [set(range(o["start"], o["end"])) for o in objects]
    evidence = record.get("evidence_frames")
    return [] if evidence is None else [set(evidence)]


def candidate_membership(record: dict, groups: list[set[int]]) -> np.ndarray:
    """(G, M) bool: candidate m shows a frame of evidence group g."""
    return np.array([[c in g for c in record["candidate_indices"]] for g in groups], dtype=bool).reshape(
        len(groups), len(record["candidate_indices"]))


def groups_hit(member: np.ndarray, combos: np.ndarray) -> np.ndarray:
    """(K,) number of evidence groups each combination hits; member (G, M), combos (K, T) positions."""
    return member[:, combos].any(-1).sum(0)


def random_hit_probability(member: np.ndarray, t: int) -> float:
    """P(a uniformly random T-subset of the M candidates hits every group), by inclusion-exclusion."""
    g, m = member.shape
    total = 0
    for r in range(g + 1):
        for subset in combinations(range(g), r):
            reach = int(member[list(subset)].any(0).sum()) if subset else 0
            total += (-1) ** r * math.comb(m - reach, t)
    return total / math.comb(m, t)


def separation_auc(losses: np.ndarray, has: np.ndarray) -> float | None:
    """P(loss with evidence < loss without), ties 1/2; None unless both kinds are present."""
    hit, miss = losses[has], losses[~has]
    if not len(hit) or not len(miss):
        return None
    d = miss[None, :] - hit[:, None]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def pairs(losses: np.ndarray, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """train_voyager.py's pairs: (better, worse) index arrays, label losses differing by more than margin."""
    better, worse = np.nonzero(losses[:, None] + margin < losses[None, :])
    return better, worse


def pair_accuracy(scores: np.ndarray, better: np.ndarray, worse: np.ndarray) -> float | None:
    """Share of pairs the scores order like the labels (higher score = better), ties 1/2."""
    if not len(better):
        return None
    d = scores[better] - scores[worse]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def additive_fit(combos: np.ndarray, losses: np.ndarray, m: int, margin: float = 0.0, seed: int = 0,
                 ridge: float = 1.0) -> tuple[float | None, float]:
    """How well loss ~ sum of per-frame effects explains a sample's labels.

    Returns (held-out pair accuracy, residual std). Ridge regression on the (K, M) frame indicators,
    2-fold over the combinations: fit on one half, rank the pairs of the other. The residual std is that
    of the fit on all combinations."""
    x = np.zeros((len(combos), m))
    np.put_along_axis(x, combos, 1.0, axis=1)

    def fit(rows: np.ndarray) -> tuple[np.ndarray, float]:
        y = losses[rows]
        a = x[rows]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(m), a.T @ (y - y.mean()))
        return w, y.mean()

    order = np.random.default_rng(seed).permutation(len(combos))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    correct = count = 0.0
    for train, test in (halves, halves[::-1]):
        w, _ = fit(train)
        better, worse = pairs(losses[test], margin)
        if len(better):
            acc = pair_accuracy(-(x[test] @ w), better, worse)  # predicted loss, lower = better
            correct, count = correct + acc * len(better), count + len(better)
    w, mean = fit(np.arange(len(combos)))
    residual = losses - mean - x @ w
    return (correct / count if count else None), float(residual.std())


def sample_stats(record: dict, objects: list[dict] | None = None, margin: float = 0.0, tie: float = 0.01,
                 seed: int = 0) -> dict:
    """Every per-sample measurement (None where undefined, e.g. no evidence recorded)."""
    losses = np.asarray(record["losses"], dtype=float)
    combos = np.asarray(record["combinations"], dtype=int)
    m, t = len(record["candidate_indices"]), combos.shape[1]
    std = float(losses.std())
    better, worse = pairs(losses, margin)
    gaps = losses[worse] - losses[better]
    additive_acc, residual = additive_fit(combos, losses, m, margin, seed)
    out = {"family": record.get("question_family") or ALL, "k": len(losses), "loss": float(losses.mean()),
           "spread": float(losses.max() - losses.min()), "std": std, "pairs": len(gaps),
           "gap": float(np.median(gaps)) if len(gaps) else None,
           "gap_sd": float(np.median(gaps) / std) if len(gaps) and std > 0 else None,
           "tie": float((gaps < tie).mean()) if len(gaps) else None,
           "tie_res": float((gaps < residual).mean()) if len(gaps) else None,
           "additive": additive_acc}
    groups = evidence_groups(record, objects)
    if not groups:
        return out
    member = candidate_membership(record, groups)
    n_hit = groups_hit(member, combos)
    has = n_hit == len(groups)
    uniform = set(uniform_indices(record["total_frames"], t))
    out.update({
        "cand": float(member.any(1).all()), "has": float(has.mean()),
        "rand": random_hit_probability(member, t),
        "unif": float(all(uniform & g for g in groups)),
        "best": float(has[losses.argmin()]),
        "auc": separation_auc(losses, has),
        "d_sd": float((losses[~has].mean() - losses[has].mean()) / std) if has.any() and (~has).any() and std > 0
        else None,
        "contrast": float((has[better] != has[worse]).mean()) if len(better) else None,
        "oracle": pair_accuracy(n_hit.astype(float), better, worse),
    })
    return out


# ---------------------------------------------------------------------------------------------
# Over samples
# ---------------------------------------------------------------------------------------------

def attach(records: list[dict], data: list[dict] | None) -> list[dict]:
    """Family and evidence from the data file (by problem_id) where it has them; the labels' copy otherwise."""
    by_id = {str(r["problem_id"]): r for r in data or []}
    out = []
    for rec in records:
        src = by_id.get(str(rec["problem_id"]), {})
        out.append({**rec, **{k: src[k] for k in ("question_family", "evidence_frames") if k in src}})
    return out


def aggregate(stats: list[dict]) -> dict[str, dict]:
    """Per family and "all": the mean of each measurement over the samples where it is defined,
    pair-weighted for the pair shares; `n` samples, `n_auc` samples with a defined AUC."""
    groups = defaultdict(list)
    for s in stats:
        groups[s["family"]].append(s)
        groups[ALL].append(s)
    pair_weighted = {"tie", "tie_res", "contrast", "oracle", "additive"}
    out = {}
    for family, rows in groups.items():
        agg = {"n": len(rows), "n_auc": sum(r.get("auc") is not None for r in rows)}
        keys = {k for r in rows for k, v in r.items() if isinstance(v, float | int) and k != "k"}
        for key in sorted(keys):
            vals = [(r[key], r["pairs"]) for r in rows if r.get(key) is not None]
            if not vals:
                continue
            if key in {"gap", "gap_sd"}:
                agg[key] = float(np.median([v for v, _ in vals]))
            elif key in pair_weighted:
                agg[key] = sum(v * w for v, w in vals) / max(1, sum(w for _, w in vals))
            else:
                agg[key] = sum(v for v, _ in vals) / len(vals)
        out[family] = agg
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == ALL, kv[0])))


def label_report(records: list[dict], meta: dict[str, list[dict]] | None = None, margin: float = 0.0,
                 tie: float = 0.01) -> dict[str, dict]:
    stats = [sample_stats(r, (meta or {}).get(str(r["problem_id"])), margin, tie) for r in records]
    return aggregate(stats)


# ---------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------

def voyager_metrics(directory: str | Path) -> dict:
    """From train_voyager.py's metrics.jsonl: the untrained (epoch 0) and final rows, and the lowest
    training loss (ln 2 = scores that ignore the pairs)."""
    rows = read_jsonl(Path(directory) / "metrics.jsonl")
    if not rows:
        return {}
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    return {"epochs": rows[-1]["epoch"], "first": rows[0], "last": rows[-1],
            "train_loss_first": losses[0] if losses else None, "train_loss_min": min(losses) if losses else None}


def fit_check(directory: str | Path, labels: str | Path, records: list[dict], model_path: str = "",
              margin: float = 0.0) -> dict:
    """Pair accuracy of the trained heads on train_voyager.py's own train and validation split, per family.

    Repeats its split (seed, val_fraction from DIR/config.yaml) over the labels with >= 2 combinations.
    Pairs differ by more than `margin` (not the training margin: runs trained with different margins
    are compared on the same pairs)."""
    import torch
    import yaml

    from common.frames import FramesConfig
    from common.models import load_model, load_processor
    from common.voyager import load_voyager
    from train_voyager import extract, summarize, validate

    cfg = yaml.safe_load((Path(directory) / "config.yaml").read_text())
    spec = json.loads((Path(directory) / "voyager.json").read_text())
    backbone = model_path or spec["backbone"]
    if not Path(backbone).exists():
        raise SystemExit(f"backbone {backbone!r} not found from here; pass --model PATH")
    rows = [r for r in read_jsonl(labels) if len(r["losses"]) >= 2]
    family = {str(r["problem_id"]): r.get("question_family") or ALL for r in records}
    order = list(range(len(rows)))
    random.Random(cfg["seed"]).shuffle(order)
    n_val = round(len(rows) * cfg["val_fraction"])
    split = {"val": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:]]}
    model = load_model(backbone, cfg.get("dtype", "float32")).eval()
    processor = load_processor(backbone, FramesConfig(max_pixels=spec.get("max_pixels", 0)))
    heads, spec_obj = load_voyager(directory, backbone=model)
    out = {}
    for name, part in split.items():
        items, _ = extract(model, processor, part, spec_obj.layers, f"features ({name})", True)
        fams = [family.get(str(r["problem_id"]), ALL) for r in part]  # extract keeps order unless a video fails
        if len(items) != len(part):
            raise SystemExit(f"{len(part) - len(items)} videos of the {name} split could not be read")
        for fam in sorted(set(fams)) + [ALL]:
            chosen = [it for it, f in zip(items, fams, strict=True) if fam in (f, ALL)]
            sums = validate(heads, chosen, margin, spec_obj.num_frames, torch.device("cpu"))
            out.setdefault(fam, {})[name] = {**summarize(sums), "n": len(chosen)}
    return out


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(title: str, report: dict[str, dict], columns: list[tuple[str, str]]) -> str:
    head = f"{'family':<11}" + "".join(f"{label:>10}" for label, _ in columns)
    lines = [title, head]
    for family, agg in report.items():
        lines.append(f"{family:<11}" + "".join(f"{fmt(agg.get(key)):>10}" for _, key in columns))
    return "\n".join(lines)


LABEL_COLUMNS = [("n", "n"), ("loss", "loss"), ("spread", "spread"), ("std", "std"), ("cand", "cand"),
                 ("combos", "has"), ("rand", "rand"), ("unif", "unif"), ("best", "best"), ("AUC", "auc"),
                 ("n_auc", "n_auc"), ("d/sd", "d_sd")]
PAIR_COLUMNS = [("pairs", "pairs"), ("gap", "gap"), ("gap/sd", "gap_sd"), ("tie<x", "tie"),
                ("tie<res", "tie_res"), ("contrast", "contrast"), ("oracle", "oracle"), ("additive", "additive")]


def print_report(report: dict[str, dict], tie: float, margin: float) -> None:
    print(table("1. labels vs evidence (combos: share of labeled combinations with the evidence; "
                "rand/unif/best: P(evidence) for random T of M, uniform T, lowest-loss combination)",
                report, LABEL_COLUMNS))
    print()
    print(table(f"2. pairs (margin {margin}; per sample; tie<x: gap < {tie} nats)", report, PAIR_COLUMNS))


def print_voyager(metrics: dict, fit: dict | None, margin: float = 0.0) -> None:
    if metrics:
        first, last = metrics["first"], metrics["last"]
        print(f"\n3. scorer ({metrics['epochs']} epochs): train ranking loss {fmt(metrics['train_loss_first'], 4)} "
              f"(epoch 1) -> {fmt(last.get('train_loss'), 4)} (last), min {fmt(metrics['train_loss_min'], 4)}; "
              f"chance ln 2 = {math.log(2):.4f}")
        keys = [k for k in last if k not in ("epoch", "train_loss")]
        short = lambda k: k.replace("evidence_recall_", "ev_").replace("pair_accuracy_large_gap", "pair_acc_large")  # noqa: E731
        print(f"{'epoch':<11}" + "".join(f"{short(k):>16}" for k in keys))
        for row in (first, last):
            print(f"{row['epoch']:<11}" + "".join(f"{fmt(row.get(k)):>16}" for k in keys))
    if fit:
        print(f"\n   heads re-run on train_voyager.py's split: pair accuracy (Spearman) per family, margin {margin}")
        print(f"{'family':<11}{'n train':>9}{'train':>16}{'n val':>7}{'val':>16}")
        for fam, parts in fit.items():
            tr, va = parts.get("train", {}), parts.get("val", {})
            cell = lambda p: f"{fmt(p.get('pair_accuracy'))} ({fmt(p.get('spearman'))})"  # noqa: E731
            print(f"{fam:<11}{tr.get('n', 0):>9}{cell(tr):>16}{va.get('n', 0):>7}{cell(va):>16}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", required=True, help="labels.jsonl of label_frames.py")
    ap.add_argument("--data", help="the labeled data file (family and evidence_frames by problem_id)")
    ap.add_argument("--meta", help="tinyworld meta.jsonl: a count question's evidence = a frame of every object")
    ap.add_argument("--voyager", help="a train_voyager.py output dir: its metrics")
    ap.add_argument("--fit", action="store_true", help="with --voyager: re-run the heads on train and val (slow)")
    ap.add_argument("--model", default="", help="with --fit: the backbone, if voyager.json's path is not valid here")
    ap.add_argument("--margin", type=float, default=0.0, help="pairs: label losses differing by more than this")
    ap.add_argument("--tie", type=float, default=0.001, help="a pair closer than this (nats) counts as a near-tie")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args(argv)

    records = [r for r in read_jsonl(a.labels) if len(r["losses"]) >= 2]
    data = json.loads(Path(a.data).read_text()) if a.data else None
    records = attach(records, data)
    meta = {str(r["problem_id"]): r["objects"] for r in read_jsonl(a.meta)} if a.meta else None
    report = label_report(records, meta, a.margin, a.tie)
    note = " (count evidence: a frame of every object, --meta)" if meta else ""
    print(f"{len(records)} labeled samples from {a.labels}{note}")
    print_report(report, a.tie, a.margin)
    metrics = voyager_metrics(a.voyager) if a.voyager else {}
    fit = fit_check(a.voyager, a.labels, records, a.model, a.margin) if a.voyager and a.fit else None
    if a.voyager:
        print_voyager(metrics, fit, a.margin)
    if a.json:
        Path(a.json).write_text(json.dumps({"labels": report, "voyager": metrics, "fit": fit}, indent=2) + "\n")


if __name__ == "__main__":
    main()
