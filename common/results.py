"""Collect a pipeline run's outputs into results.json and RESULTS.md (tables + plots).

    python -m common.results --out outputs/tiny

Reads, under --out: eval/<name>/summary.json, grpo/ and ktr/ metrics.jsonl + tokens.jsonl,
timings.jsonl (seconds per stage, written by run.sh) and every stage's skipped.jsonl / failures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from common.jsonl import read_jsonl, write_json

QA_RUNS = {"sft": "sft_uniform", "grpo": "grpo_uniform", "ktr": "ktr_uniform", "sft_all_frames": "sft_all"}
# RL runs by seed (run.sh: RL_SEEDS=N and `bash run.sh ablation`): <run>[_seed<k>] trained into OUT/<run>[_seed<k>]
# and evaluated into eval/<run>[_seed<k>]_<frames>; seed 0 has no suffix, so it is the default pipeline's run.
# A run named *_voyager (run.sh RL_FRAMES=voyager) trained on the frames Voyager picks and is judged on them;
# every other run on uniform frames. An evaluation on other frames than the run's own is not a seed-table entry.
RL_EVAL = re.compile(r"^(?P<run>(?:grpo|ktr)(?:_[a-z]+)*)(?:_seed(?P<seed>\d+))?_(?P<frames>uniform|voyager)$")
# The paper's ablation (mean of Video-Holmes / VideoMMMU / MMVU at 32 frames, Video-KTR Table) next to our rows.
PAPER_ABLATION = {"grpo": 51.1, "ktr_temporal": 52.6, "ktr_visual": 52.5, "ktr": 53.4}
ABLATION_NAMES = {"grpo": "GRPO (no signal)", "ktr_visual": "visual only", "ktr_temporal": "temporal only",
                  "ktr_entropy": "entropy only", "ktr": "all three (KTR)",
                  "grpo_voyager": "GRPO on Voyager's frames", "ktr_voyager": "KTR on Voyager's frames"}
MAIN_RUNS = ("grpo", "ktr", "grpo_voyager", "ktr_voyager")  # drawn bold with their seeds' band
# Two-sided 95 % Student t quantiles by degrees of freedom, for intervals over a few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
FRAME_RUNS = {"uniform": "sft_uniform",  # eval/<dir> of each frame strategy; M = 16 candidates, or 32
              "retrieval": "sft_retrieval_m16", "aks": "sft_aks_m16", "dpp": "sft_dpp_m16",
              "voyager": "sft_voyager_m16", "retrieval_m32": "sft_retrieval_m32", "aks_m32": "sft_aks_m32",
              "dpp_m32": "sft_dpp_m32", "voyager_m32": "sft_voyager_m32",
              # run.sh CROSS_VOYAGER=DIR: a scorer trained on another model (its own backbone) picks the frames
              "voyager_cross": "sft_voyager_cross_m16", "voyager_cross_m32": "sft_voyager_cross_m32"}


def run_frames(run: str) -> str:
    """The frames an RL run trained on, and is judged on: voyager for a *_voyager run, else uniform."""
    return "voyager" if run.endswith("_voyager") else "uniform"


def baseline(run: str) -> str:
    """The GRPO run a run is paired with: GRPO on the same frames."""
    return "grpo_voyager" if run_frames(run) == "voyager" else "grpo"


def informative_spans(text: str, words: list[str]) -> list[tuple[int, int]]:
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return [m.span() for m in pattern.finditer(text)]


def token_informativeness(rows: list[dict], words: list[str]) -> dict:
    """Which tokens each signal selected: the fraction selected, and among the selected, the share
    inside <answer>...</answer> and the share that are informative words (colours, shapes, counts,
    option letters, order words) rather than template words, next to the base rate over all tokens."""
    totals: dict[str, dict[str, int]] = {}
    base = {"tokens": 0, "answer": 0, "informative": 0}
    for row in rows:
        text, offsets = "", []
        for tok in row["tokens"]:
            offsets.append((len(text), len(text) + len(tok)))
            text += tok
        spans = informative_spans(text, words)
        answer = [m.span(1) for m in re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL)]

        def inside(span, regions):
            return any(a < span[1] and span[0] < b for a, b in regions)

        flags = [(inside(o, answer), inside(o, spans)) for o in offsets]
        base["tokens"] += len(flags)
        base["answer"] += sum(a for a, _ in flags)
        base["informative"] += sum(i for _, i in flags)
        signals = dict(row["selected"])
        if signals:
            signals["union"] = "".join("1" if "1" in bits else "0" for bits in zip(*signals.values(), strict=True))
        for name, bits in signals.items():
            t = totals.setdefault(name, {"tokens": 0, "selected": 0, "answer": 0, "informative": 0})
            t["tokens"] += len(bits)
            for bit, (in_answer, informative) in zip(bits, flags, strict=True):
                if bit == "1":
                    t["selected"] += 1
                    t["answer"] += in_answer
                    t["informative"] += informative
    out = {name: {"selected_fraction": t["selected"] / max(t["tokens"], 1),
                  "share_in_answer": t["answer"] / max(t["selected"], 1),
                  "share_informative": t["informative"] / max(t["selected"], 1)} for name, t in totals.items()}
    out["all_tokens"] = {"share_in_answer": base["answer"] / max(base["tokens"], 1),
                         "share_informative": base["informative"] / max(base["tokens"], 1)}
    return out


def tinyworld_words() -> list[str]:
    from common import tinyworld

    return [*tinyworld.COLORS, *tinyworld.SHAPES, "A", "B", "C", "D", "1", "2", "3", "4", "first", "last",
            "before", "after", "brief", "moment"]


def qa_entry(summary: dict) -> dict:
    return {"accuracy": summary["accuracy"], "n": summary["n"], "n_failed": summary["n_failed"],
            "by_family": {k: v["accuracy"] for k, v in summary["by_source"]["question_family"].items()}}


def frame_entry(summary: dict) -> dict:
    return {**qa_entry(summary), "evidence_recall": summary.get("evidence_recall"),
            "evidence_recall_by_family": summary.get("evidence_recall_by_family", {})}


VOYAGER_METRICS = ("pair_accuracy", "pair_accuracy_large_gap", "spearman", "evidence_recall_voyager",
                   "evidence_recall_uniform", "evidence_recall_label_best")  # RESULTS.md's columns, in order


def voyager_entry(summary: dict) -> dict:
    """The scorer's ranking on its validation samples (train_voyager.py's summary.json: the last epoch)."""
    final = summary.get("final", {})
    return {"train_samples": summary.get("train_samples"), "val_samples": summary.get("val_samples"),
            "median_val_gap": summary.get("median_val_gap"), "coverage": summary.get("spec", {}).get("coverage", False),
            **{k: final.get(k) for k in VOYAGER_METRICS}}


def step_mean(metrics: list[dict], key: str) -> float | None:
    """The mean of a metric over the logged steps that have it (None when none has it: an older run)."""
    values = [m[key] for m in metrics if m.get(key) is not None]
    return sum(values) / len(values) if values else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def paired_interval(differences: list[float]) -> dict:
    """Mean of paired differences with a 95 % t interval (None with fewer than 2 pairs)."""
    m, sd = mean_std(differences)
    n = len(differences)
    half = T95.get(n - 1, 1.96) * sd / n ** 0.5 if n > 1 else None
    return {"n": n, "mean": m, "per_seed": differences,
            "ci95": None if half is None else [m - half, m + half]}


def collect_seeds(out: Path) -> dict:
    """Every RL run's test accuracy by seed, its mean and spread, the fraction of tokens it selected, and
    each run's paired difference to GRPO on the same frames over the seeds both have (same seeds = same
    prompts)."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((out / "eval").glob("*/summary.json")):
        match = RL_EVAL.match(path.parent.name)
        if match is None or match["frames"] != run_frames(match["run"]):
            continue
        run, seed = match["run"], int(match["seed"] or 0)
        entry = qa_entry(json.loads(path.read_text()))
        metrics = read_jsonl(out / (run + (f"_seed{seed}" if seed else "")) / "metrics.jsonl")
        if metrics:
            keys = [k for k in metrics[0] if k.startswith("selected/")]
            entry["selected"] = {k.removeprefix("selected/"): sum(m[k] for m in metrics) / len(metrics) for k in keys}
            if (kept := step_mean(metrics, "gradient_share/union")) is not None:  # KTR runs since 2026-12-03
                entry["gradient_kept"] = kept
            entry["train_reward"] = [m["reward"] for m in metrics]
        runs.setdefault(run, {})[seed] = entry
    table = {}
    for run, by_seed in sorted(runs.items()):
        accuracies = [e["accuracy"] for e in by_seed.values()]
        families = sorted({f for e in by_seed.values() for f in e["by_family"]})
        selected_keys = sorted({k for e in by_seed.values() for k in e.get("selected", {})})
        table[run] = {
            "seeds": sorted(by_seed), "accuracy": dict(zip(["mean", "std"], mean_std(accuracies), strict=True)),
            "per_seed": {str(k): e["accuracy"] for k, e in sorted(by_seed.items())},
            "by_family": {f: mean_std([e["by_family"][f] for e in by_seed.values() if f in e["by_family"]])[0]
                          for f in families},
            "selected": {k: mean_std([e["selected"][k] for e in by_seed.values() if k in e.get("selected", {})])[0]
                         for k in selected_keys},
            "train_reward": {str(k): e.get("train_reward", []) for k, e in sorted(by_seed.items())},
        }
        kept = [e["gradient_kept"] for e in by_seed.values() if "gradient_kept" in e]
        if kept:
            table[run]["gradient_kept"] = mean_std(kept)[0]
    paired = {}
    for run, by_seed in runs.items():
        base = baseline(run)
        common = sorted(set(by_seed) & set(runs.get(base, {})))
        if run != base and common:
            paired[f"{run} - {base}"] = paired_interval(
                [by_seed[k]["accuracy"] - runs[base][k]["accuracy"] for k in common])
    return {"runs": table, "paired": paired}


def collect(out: Path) -> dict:
    def summary(name: str) -> dict | None:
        path = out / "eval" / name / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    results: dict = {"qa": {}, "frame_selection": {}, "ktr_tokens": {}, "timings": {}, "skipped": {},
                     "date": time.strftime("%Y-%m-%d")}
    seeds = collect_seeds(out)
    if set(seeds["runs"]) - {"grpo", "ktr"} or any(len(r["seeds"]) > 1 for r in seeds["runs"].values()):
        results["seeds"] = seeds  # only when there is more than the default one-seed GRPO / KTR pair
    for key, name in QA_RUNS.items():
        if (s := summary(name)) is not None:
            results["qa"][key] = qa_entry(s)
    for key, name in FRAME_RUNS.items():
        if (s := summary(name)) is not None:
            results["frame_selection"][key] = frame_entry(s)
    if (out / "voyager" / "summary.json").exists():
        results["voyager"] = voyager_entry(json.loads((out / "voyager" / "summary.json").read_text()))
    if (out / "ktr" / "tokens.jsonl").exists():
        results["ktr_tokens"] = token_informativeness(read_jsonl(out / "ktr" / "tokens.jsonl"), tinyworld_words())
        metrics = read_jsonl(out / "ktr" / "metrics.jsonl") if (out / "ktr" / "metrics.jsonl").exists() else []
        for name, entry in results["ktr_tokens"].items():  # each signal's share of GRPO's gradient, over steps
            if (kept := step_mean(metrics, f"gradient_share/{name}")) is not None:
                entry["gradient_kept"] = kept
    for row in read_jsonl(out / "timings.jsonl"):
        results["timings"][row["stage"]] = row["seconds"]
    for path in sorted(out.rglob("skipped.jsonl")):
        rows = read_jsonl(path)
        if rows:
            reasons = [r.get("error") or r.get("reason") for r in rows]  # label_frames says "reason"
            results["skipped"][str(path.parent.relative_to(out))] = {"n": len(rows), "reasons": reasons}
    for path in sorted((out / "eval").glob("*/summary.json")):
        failures = json.loads(path.read_text()).get("failures", [])
        if failures:
            results["skipped"][f"eval/{path.parent.name}"] = {"n": len(failures),
                                                               "reasons": [f["error"] for f in failures]}
    return results


RL_RUN = re.compile(r"^(?P<run>(?:grpo|ktr)(?:_[a-z]+)*)(?:_seed\d+)?$")  # OUT/<run>[_seed<k>]: the pipeline's RL runs
SIGNAL_COLORS = {"visual": "tab:blue", "temporal": "tab:orange", "entropy": "tab:green", "union": "black"}


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average of each row (seeds x steps), NaN-aware so that a missing value only thins the window."""
    kernel = np.ones(window)
    finite = np.isfinite(values)
    sums = np.array([np.convolve(np.where(f, v, 0.0), kernel, mode="valid") for v, f in zip(values, finite,
                                                                                            strict=True)])
    counts = np.array([np.convolve(f.astype(float), kernel, mode="valid") for f in finite])
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def draw(ax, steps: list[int], values: np.ndarray, color: str, label: str, raw: bool = True, band: bool = True,
         **style) -> None:
    """Seeds' smoothed mean (a tenth of the run per window), the seeds' range as a band and the raw mean faint."""
    window = max(1, len(steps) // 10)
    smooth = smoothed(values, window)
    x = steps[window - 1:]
    if raw:
        ax.plot(steps, np.nanmean(values, 0), color=color, alpha=0.2, linewidth=0.8)
    ax.plot(x, np.nanmean(smooth, 0), color=color, label=label, **style)
    if band and len(values) > 1:
        ax.fill_between(x, np.nanmin(smooth, 0), np.nanmax(smooth, 0), color=color, alpha=0.15, linewidth=0)


def family_accuracy(rows: list[dict], n_bins: int = 10) -> tuple[list[float], dict[str, list[float]]]:
    """Sampled training accuracy by question family over steps, in n_bins bins of steps (a step holds
    only a few prompts per family: one step alone is mostly noise)."""
    if not rows:
        return [], {}
    last = max(r["step"] for r in rows)
    width = max(1, math.ceil(last / n_bins))
    sums: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        b = (r["step"] - 1) // width
        s = sums.setdefault(str(r.get("question_family")), {}).setdefault(b, [0.0, 0])
        s[0] += r["reward"].get("accuracy", 0.0)
        s[1] += 1
    bins = range(math.ceil(last / width))
    centers = [b * width + (width + 1) / 2 for b in bins]
    return centers, {f: [v[b][0] / v[b][1] if b in v else math.nan for b in bins] for f, v in sorted(sums.items())}


def plots(out: Path) -> list[str]:
    """Training curves of every RL run (reward, accuracy, KL, completion length, tokens selected, per-family
    accuracy; smoothed, seeds' spread as a band) and evidence recall per frame strategy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # every seed of every RL run: OUT/grpo, OUT/grpo_seed1, OUT/ktr_visual, ...
    runs: dict[str, list[Path]] = {}
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if (m := RL_RUN.match(p.name)) and (p / "metrics.jsonl").exists():
            runs.setdefault(m["run"], []).append(p)
    order = list(ABLATION_NAMES)
    runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if runs:
        colors = {"grpo": "tab:blue", "ktr": "tab:red", "ktr_visual": "tab:cyan", "ktr_temporal": "tab:orange",
                  "ktr_entropy": "tab:green", "grpo_voyager": "tab:purple", "ktr_voyager": "tab:brown"}
        metrics = {name: [read_jsonl(p / "metrics.jsonl") for p in dirs] for name, dirs in runs.items()}
        panels = [("reward", "training reward"), ("accuracy", "training accuracy (sampled)"),
                  ("kl", "KL to the reference"), ("completion_length", "completion length (tokens)"),
                  ("selected/union", "tokens with gradient (union of signals)"),
                  ("zero_advantage", "groups with zero advantage (all right / all wrong)")]
        tokens = {name: [read_jsonl(p / "tokens.jsonl") for p in runs[name]] for name in MAIN_RUNS if name in runs}
        families = sorted({f for seeds in tokens.values() for rows in seeds for f in family_accuracy(rows)[1]})
        fig, axes = plt.subplots(3, 4, figsize=(18, 11))
        for name, seeds in metrics.items():
            n = min(len(rows) for rows in seeds)
            steps = [r["step"] for r in seeds[0][:n]]
            main = name in MAIN_RUNS  # the ablations thinner: GRPO vs KTR reads at a glance
            style = {"linewidth": 2.0 if main else 1.2, "alpha": 1.0 if main else 0.8}
            label = f"{ABLATION_NAMES.get(name, name)} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
            for ax, (key, _) in zip(axes.flat, panels, strict=False):
                if key == "zero_advantage":
                    values = np.array([[r.get("all_correct_groups", math.nan) + r.get("all_wrong_groups", math.nan)
                                        for r in rows[:n]] for rows in seeds])
                else:
                    values = np.array([[r.get(key, math.nan) for r in rows[:n]] for rows in seeds], dtype=float)
                if np.isfinite(values).any():
                    draw(ax, steps, values, colors.get(name, "gray"), label, raw=main, band=main, **style)
            if name == "ktr":  # each signal's share next to their union
                ax = axes.flat[len(panels)]
                for signal, color in SIGNAL_COLORS.items():
                    values = np.array([[r.get(f"selected/{signal}", math.nan) for r in rows[:n]] for rows in seeds],
                                      dtype=float)  # a missing value (None) becomes NaN
                    if np.isfinite(values).any():
                        draw(ax, steps, values, color, signal, raw=False)
                # how much of GRPO's per-token gradient, |A| (1 - p), those tokens keep (logged since 2026-12-03)
                values = np.array([[r.get("gradient_share/union", math.nan) for r in rows[:n]] for rows in seeds],
                                  dtype=float)
                if np.isfinite(values).any():
                    draw(ax, steps, values, "black", "union: share of GRPO's gradient", raw=False, linestyle="--")
        ktr_title = "KTR: tokens selected per signal\n(dashed: the share of GRPO's gradient they keep)"
        for ax, (_, title) in zip(axes.flat, [*panels, (None, ktr_title)], strict=False):
            ax.set_title(title, fontsize=10)
        axes.flat[len(panels) + 1].axis("off")  # the run legend goes here
        handles, labels = axes.flat[0].get_legend_handles_labels()
        axes.flat[len(panels) + 1].legend(handles, labels, loc="center", fontsize=10,
                                          title="smoothed over a tenth of the run;\n"
                                                "faint: raw; band: seeds' range\n(both for the bold runs only)")
        if axes.flat[len(panels)].lines:
            axes.flat[len(panels)].legend(fontsize=8)
        for i, ax in enumerate(axes.flat[8:]):
            if i >= len(families):
                ax.axis("off")
                continue
            family = families[i]
            for name, seeds in tokens.items():
                per_seed = [family_accuracy(rows) for rows in seeds if rows]
                if not per_seed:
                    continue
                width = min(len(c) for c, _ in per_seed)
                values = np.array([f.get(family, [math.nan] * width)[:width] for _, f in per_seed], dtype=float)
                x = per_seed[0][0][:width]
                ax.plot(x, np.nanmean(values, 0), marker="o", markersize=3, color=colors[name],
                        label=ABLATION_NAMES.get(name, name))
                if len(values) > 1:
                    ax.fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), color=colors[name], alpha=0.15,
                                    linewidth=0)
            ax.set_title(f"training accuracy: {family} (tenths of the run)", fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)
        for ax in axes.flat:
            if ax.axison:
                ax.set_xlabel("step", fontsize=9)
                ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=90)
        plt.close(fig)
        made.append("training_curves.png")
    frame = collect(out)["frame_selection"]
    if frame:  # accuracy and evidence recall per family, one bar per strategy, the legend beside the panels
        families = sorted({f for e in frame.values() for f in e["by_family"]} |
                          {f for e in frame.values() for f in e["evidence_recall_by_family"]})
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), sharey=True)
        width = 0.8 / len(frame)
        parts = {name: re.match(r"^(.*?)(?:_m(\d+))?$", name).groups() for name in frame}  # (strategy, M or None)
        bases = list(dict.fromkeys(base for base, _ in parts.values()))  # a strategy keeps its colour
        groups = ["all"] + families
        colors = plt.get_cmap("tab10" if len(bases) <= 10 else "tab20")
        panels = [(axes[0], "accuracy", lambda e, f: e["accuracy"] if f == "all" else e["by_family"].get(f)),
                  (axes[1], "evidence recall",
                   lambda e, f: e["evidence_recall"] if f == "all" else e["evidence_recall_by_family"].get(f))]
        for ax, title, value in panels:
            for i, (name, e) in enumerate(frame.items()):
                base, m = parts[name]  # M = 32 rows hatched
                ax.bar([j + i * width for j in range(len(groups))], [value(e, f) or 0.0 for f in groups], width,
                       label=f"{base}, M = {m}" if m else name, color=colors(bases.index(base)),
                       hatch="///" if m else None, edgecolor="white", linewidth=0)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
            ax.set_title(title, fontsize=10)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
        axes[0].axhline(0.25, color="black", linestyle=":", linewidth=1, label="a blind guess (0.25)")
        axes[0].set_ylabel("the SFT model, 8 frames")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                   title="8 frames of M = 16\ncandidates unless said", title_fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "frame_selection.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("frame_selection.png")
    return made


def fmt(x) -> str:
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(results: dict, images: list[str]) -> str:
    lines = [f"# Results ({results['date']})", ""]
    if results["qa"]:
        families = sorted({f for e in results["qa"].values() for f in e["by_family"]})
        lines += ["## Question answering (8 uniform frames; sft_all_frames: every frame)", "",
                  "| model | accuracy | " + " | ".join(families) + " |",
                  "|---|---|" + "---|" * len(families)]
        for name, e in results["qa"].items():
            lines.append(f"| {name} | {fmt(e['accuracy'])} | "
                         + " | ".join(fmt(e["by_family"].get(f)) for f in families) + " |")
        lines.append("")
    if results.get("seeds"):
        lines += seeds_markdown(results["seeds"])
    if results["frame_selection"]:
        families = sorted({f for e in results["frame_selection"].values() for f in e["by_family"]})
        recall_families = sorted({f for e in results["frame_selection"].values()
                                  for f in e["evidence_recall_by_family"]})
        lines += ["## Frame selection (the SFT model sees 8 frames picked from M = 16 candidates, or 32)", "",
                  "Accuracy and evidence recall (the share of a question's evidence frames among those seen),",
                  "overall and per family; the same answering model for every strategy"
                  + ("; voyager_cross: a scorer trained on another model, running its own backbone (run.sh "
                     "CROSS_VOYAGER)." if any(k.startswith("voyager_cross") for k in results["frame_selection"])
                     else "."), "",
                  "| strategy | accuracy | " + " | ".join(families) + " | evidence recall | "
                  + " | ".join(f"recall {f}" for f in recall_families) + " |",
                  "|---|---|" + "---|" * (len(families) + 1 + len(recall_families))]
        for name, e in results["frame_selection"].items():
            lines.append(f"| {name} | {fmt(e['accuracy'])} | "
                         + " | ".join(fmt(e["by_family"].get(f)) for f in families)
                         + f" | {fmt(e['evidence_recall'])} | "
                         + " | ".join(fmt(e["evidence_recall_by_family"].get(f)) for f in recall_families) + " |")
        lines.append("")
    if results.get("voyager"):
        v = results["voyager"]
        lines += ["## The Voyager scorer (its validation samples, the last epoch)", "",
                  f"Trained on {v['train_samples']} labeled samples, validated on {v['val_samples']}"
                  + (" (with the coverage head)" if v["coverage"] else "") + ". Pair accuracy: the share of "
                  "pairs of labeled combinations the scorer orders as their answer losses do; the larger-gap half: "
                  f"the pairs whose losses differ by more than the median, {fmt(v['median_val_gap'])} nats. "
                  "Evidence recall of the frames the scorer picks, uniform frames and the best-labeled combination.",
                  "", "| pair accuracy | larger-gap half | Spearman | evidence recall: Voyager | uniform | "
                  "best label |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(fmt(v[k]) for k in VOYAGER_METRICS) + " |", ""]
    if results["ktr_tokens"]:
        lines += ["## Which tokens KTR selected", "",
                  "| signal | fraction selected | share inside `<answer>` | share informative words | "
                  "share of GRPO's gradient |", "|---|---|---|---|---|"]
        for name, e in results["ktr_tokens"].items():
            lines.append(f"| {name} | {fmt(e.get('selected_fraction'))} | {fmt(e['share_in_answer'])} | "
                         f"{fmt(e['share_informative'])} | {fmt(e.get('gradient_kept'))} |")
        lines += ["", "`all_tokens` is the base rate: a selection that prefers informative tokens beats it. The "
                  "share of GRPO's gradient: of GRPO's per-token gradient |A| (1 - p), the share on the selected "
                  "tokens (mean over steps; near 1, KTR's update is GRPO's).", ""]
    lines += ["## Skipped inputs", ""]
    if not results["skipped"]:
        lines += ["No stage skipped a sample.", ""]
    else:
        lines += ["| stage | n | reasons (first 3) |", "|---|---|---|"]
        for stage, e in results["skipped"].items():
            lines.append(f"| {stage} | {e['n']} | {'; '.join(e['reasons'][:3])} |")
        lines.append("")
    if results["timings"]:
        lines += ["## Time per stage (s)", "",
                  "After SFT, run.sh runs JOBS stages side by side (default 2), so their times overlap; the "
                  "last row, when there, is the wall clock of the last `run.sh` call.", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["timings"].items()] + [""]
    lines += [f"![{img}]({img})" for img in images]
    if results["ktr_tokens"]:
        lines += ["", "Token attributions of sampled KTR completions: [ktr/attribution.html](ktr/attribution.html)"]
    return "\n".join(lines) + "\n"


def seeds_markdown(seeds: dict) -> list[str]:
    """The seed comparison and the paper's ablation on the tiny default, as Markdown lines."""
    runs = seeds["runs"]
    families = sorted({f for r in runs.values() for f in r["by_family"]})
    order = ["visual", "temporal", "entropy", "union"]
    signals = sorted({k for r in runs.values() for k in r["selected"]}, key=lambda k: order.index(k) if k in order
                     else len(order))
    kept = any("gradient_kept" in r for r in runs.values())
    voyager = any(run_frames(run) == "voyager" for run in runs)
    frames = "8 frames: uniform, Voyager's for the *_voyager runs" if voyager else "8 uniform frames"
    lines = [f"## RL over seeds: the paper's ablation on the tiny default (test split, greedy, {frames})", "",
             "Accuracy is the mean ± std over seeds; per-family columns are means; the selected fractions are",
             "averaged over training steps"
             + ("; GRPO's gradient kept is the share of GRPO's per-token gradient, |A| (1 - p), on the selected"
                " tokens (near 1: KTR's update is GRPO's)" if kept else "")
             + "; the paper column is the Video-KTR ablation (mean of three benchmarks)."
             + (" Runs on Voyager's frames (run.sh RL_FRAMES=voyager) trained and are judged on the 8 frames the"
                " scorer picks from 16 candidates: compare them with the SFT model's `voyager` row of the frame"
                " selection table." if voyager else ""), "",
             "| run | seeds | accuracy | " + " | ".join(families) + " | " + " | ".join(f"sel. {k}" for k in signals)
             + (" | GRPO's gradient kept" if kept else "") + " | paper |",
             "|---|---|---|" + "---|" * (len(families) + len(signals) + kept + 1)]
    for run in sorted(runs, key=lambda r: list(ABLATION_NAMES).index(r) if r in ABLATION_NAMES else 99):
        r = runs[run]
        paper = PAPER_ABLATION.get(run)
        lines.append(f"| {ABLATION_NAMES.get(run, run)} | {len(r['seeds'])} | {r['accuracy']['mean']:.3f} ± "
                     f"{r['accuracy']['std']:.3f} | " + " | ".join(fmt(r["by_family"].get(f)) for f in families)
                     + " | " + " | ".join(fmt(r["selected"].get(k)) for k in signals)
                     + (f" | {fmt(r.get('gradient_kept'))}" if kept else "")
                     + f" | {'' if paper is None else paper} |")
    if seeds["paired"]:
        lines += ["", "Paired differences to GRPO (same seeds, so the same prompts and sampling seeds):", "",
                  "| difference | seeds | mean | 95 % interval | per seed |", "|---|---|---|---|---|"]
        for name, d in seeds["paired"].items():
            ci = "" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            lines.append(f"| {name} | {d['n']} | {d['mean']:+.3f} | {ci} | "
                         + ", ".join(f"{x:+.3f}" for x in d["per_seed"]) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m common.results")
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    results = collect(out)
    images = plots(out)
    write_json(out / "results.json", results)
    (out / "RESULTS.md").write_text(markdown(results, images))
    print((out / "RESULTS.md").read_text())
    print(f"results -> {out / 'results.json'}, {out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
