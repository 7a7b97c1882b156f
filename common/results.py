"""Collect a pipeline run's outputs into results.json and RESULTS.md (tables + plots).

    python -m common.results --out outputs/tiny

Reads, under --out: eval/<name>/summary.json, grpo/ and ktr/ metrics.jsonl + tokens.jsonl,
timings.jsonl (seconds per stage, written by run.sh) and every stage's skipped.jsonl / failures.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from common.jsonl import read_jsonl, write_json

QA_RUNS = {"sft": "sft_uniform", "grpo": "grpo_uniform", "ktr": "ktr_uniform", "sft_all_frames": "sft_all"}
FRAME_RUNS = {"uniform": "sft_uniform", "retrieval": "sft_retrieval_m16", "voyager": "sft_voyager_m16",
              "retrieval_m32": "sft_retrieval_m32", "voyager_m32": "sft_voyager_m32"}


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


def collect(out: Path) -> dict:
    def summary(name: str) -> dict | None:
        path = out / "eval" / name / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    results: dict = {"qa": {}, "frame_selection": {}, "ktr_tokens": {}, "timings": {}, "skipped": {},
                     "date": time.strftime("%Y-%m-%d")}
    for key, name in QA_RUNS.items():
        if (s := summary(name)) is not None:
            results["qa"][key] = qa_entry(s)
    for key, name in FRAME_RUNS.items():
        if (s := summary(name)) is not None:
            results["frame_selection"][key] = frame_entry(s)
    if (out / "ktr" / "tokens.jsonl").exists():
        results["ktr_tokens"] = token_informativeness(read_jsonl(out / "ktr" / "tokens.jsonl"), tinyworld_words())
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


def plots(out: Path) -> list[str]:
    """reward / KL curves of GRPO vs KTR, and evidence recall per frame strategy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    runs = {name: read_jsonl(out / name / "metrics.jsonl") for name in ("grpo", "ktr")}
    if any(runs.values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for name, rows in runs.items():
            if rows:
                axes[0].plot([r["step"] for r in rows], [r["reward"] for r in rows], label=name)
                axes[1].plot([r["step"] for r in rows], [r["kl"] for r in rows], label=name)
        for ax, title in zip(axes, ("reward (mean over completions)", "KL to reference"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=100)
        plt.close(fig)
        made.append("training_curves.png")
    frame = collect(out)["frame_selection"]
    if frame:
        families = sorted({f for e in frame.values() for f in e["evidence_recall_by_family"]})
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(frame)
        for i, (name, e) in enumerate(frame.items()):
            ax.bar([j + i * width for j in range(len(families))],
                   [e["evidence_recall_by_family"].get(f, 0) for f in families], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
        ax.set_ylabel("evidence recall")
        ax.set_ylim(0, 1.05)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "evidence_recall.png", dpi=100)
        plt.close(fig)
        made.append("evidence_recall.png")
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
    if results["frame_selection"]:
        families = sorted({f for e in results["frame_selection"].values() for f in e["by_family"]})
        lines += ["## Frame selection (the SFT model sees 8 frames picked from M = 16 candidates, or 32)", "",
                  "| strategy | accuracy | evidence recall | moment accuracy | moment evidence recall |",
                  "|---|---|---|---|---|"]
        for name, e in results["frame_selection"].items():
            lines.append(f"| {name} | {fmt(e['accuracy'])} | {fmt(e['evidence_recall'])} | "
                         f"{fmt(e['by_family'].get('moment'))} | {fmt(e['evidence_recall_by_family'].get('moment'))} |")
        lines.append("")
    if results["ktr_tokens"]:
        lines += ["## Which tokens KTR selected", "",
                  "| signal | fraction selected | share inside `<answer>` | share informative words |",
                  "|---|---|---|---|"]
        for name, e in results["ktr_tokens"].items():
            lines.append(f"| {name} | {fmt(e.get('selected_fraction'))} | {fmt(e['share_in_answer'])} | "
                         f"{fmt(e['share_informative'])} |")
        lines += ["", "`all_tokens` is the base rate: a selection that prefers informative tokens beats it.", ""]
    lines += ["## Skipped inputs", ""]
    if not results["skipped"]:
        lines += ["No stage skipped a sample.", ""]
    else:
        lines += ["| stage | n | reasons (first 3) |", "|---|---|---|"]
        for stage, e in results["skipped"].items():
            lines.append(f"| {stage} | {e['n']} | {'; '.join(e['reasons'][:3])} |")
        lines.append("")
    if results["timings"]:
        lines += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["timings"].items()] + [""]
    lines += [f"![{img}]({img})" for img in images]
    if results["ktr_tokens"]:
        lines += ["", "Token attributions of sampled KTR completions: [ktr/attribution.html](ktr/attribution.html)"]
    return "\n".join(lines) + "\n"


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
