"""Readable artefacts: the token-attribution page (one self-contained HTML file, no server needed)
and the scalars handed to experiment trackers."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import itertools
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SIGNALS = ("visual", "temporal", "entropy")
THUMB_HEIGHT = 64  # px: small enough that a group's frames fit one row and the page stays small
SIGNAL_CLASS = {"visual": "v", "temporal": "t", "entropy": "e"}  # short class names: the page has one span per token

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 1500px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
table.summary {{ border-collapse: collapse; margin: 0.4em 1.5em 0.8em 0; display: inline-table; vertical-align: top; }}
table.summary td, table.summary th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; font-size: 0.9em; }}
.group {{ border: 1px solid #bbb; border-radius: 6px; padding: 0.6em 0.8em; margin: 1.2em 0; background: #fafafa; }}
.prompt {{ margin-bottom: 0.5em; }} .prompt .q {{ font-weight: 600; }} .muted {{ color: #666; font-size: 0.88em; }}
.frames {{ display: flex; gap: 4px; flex-wrap: wrap; margin: 0.3em 0; align-items: flex-end; }}
.frames figure {{ margin: 0; text-align: center; font-size: 0.72em; color: #555; }}
.frames img {{ height: {thumb}px; display: block; border: 1px solid #999; }}
.frames .label {{ width: 8.5em; font-size: 0.8em; color: #555; align-self: center; }}
.options {{ margin: 0.2em 0; padding: 0; }} .options li {{ display: inline; margin-right: 1.5em; list-style: none; }}
.samples {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 8px; }}
.sample {{ border: 1px solid #ddd; border-left: 6px solid #999; border-radius: 4px; padding: 0.4em 0.6em;
  background: #fff; }}
.sample[data-verdict=correct] {{ border-left-color: #2ca02c; }}
.sample[data-verdict=wrong] {{ border-left-color: #d62728; background: #fff8f8; }}
.sample .head {{ font-size: 0.82em; color: #444; margin-bottom: 0.3em; }}
.tokens {{ font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 2.1; white-space: pre-wrap;
  word-break: break-word; }}
.tok {{ padding: 0 1px; }} .tok:hover {{ outline: 1px solid #999; }}
.v {{ border-bottom: 3px solid #1f77b4; }} .t {{ border-top: 3px solid #ff7f0e; }} .e {{ background: #c7e9c0; }}
.legend span {{ margin-right: 1.5em; padding: 0 4px; }}
</style></head><body><h2>{title}</h2>
{summary}
<p class="legend">Selected by: {legend} &mdash; hover a token for its scores. Left bar: green = correct,
red = wrong (accuracy reward). Completions of a prompt are shown together, highest advantage first.</p>
{groups}
<script>/* the counterfactual row re-uses the thumbnails above it: each image is stored once */
document.querySelectorAll("img[data-ref]").forEach(i => {{ i.src = document.getElementById(i.dataset.ref).src; }});
</script></body></html>"""


def thumbnail(frame: np.ndarray, height: int = THUMB_HEIGHT) -> str:
    """A frame (H x W x 3 uint8) as a small JPEG data URI: tiny enough to embed many in one page."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame[..., :3]).astype(np.uint8))
    width = max(1, round(image.width * height / image.height))
    buffer = io.BytesIO()
    image.convert("RGB").resize((width, height), Image.BILINEAR).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def prompt_media(visual, order: list[int] | None = None, order_note: str = "", height: int = THUMB_HEIGHT) -> dict:
    """What the model saw for one prompt: thumbnails with their timestamps (a video Clip) or the image,
    and the frame order of the temporal counterfactual (position i showed frame order[i])."""
    if hasattr(visual, "frames"):  # a Clip
        frames = [{"src": thumbnail(f, height), "label": f"{t:.1f}s", "title": f"frame {i} of the video, t = {t:.2f}s"}
                  for f, t, i in zip(visual.frames, visual.timestamps, visual.indices, strict=True)]
    else:
        frames = [{"src": thumbnail(np.asarray(visual), height), "label": "image", "title": "image"}]
    if order is not None:  # the processor may pad a video to whole temporal patches by repeating the last frame
        order = [min(i, len(frames) - 1) for i in order]
    return {"frames": frames, "order": order, "order_note": order_note}


def prompt_key(row: dict) -> str:
    return f"{row.get('step')}/{row.get('problem_id', row['question'])}"


def selection_summary(rows: Iterable[dict]) -> dict:
    """Over token rows (tokens.jsonl): the fraction of tokens each signal selected and their union, each
    pair's Jaccard overlap, and the mean score of selected vs unselected tokens per signal."""
    tokens, union, picked, pairs = 0, 0, {}, {}
    sums: dict[str, list[float]] = {}  # signal -> [sum selected, n selected, sum unselected, n unselected]
    n_rows = 0
    for row in rows:
        n_rows += 1
        bits = row["selected"]
        tokens += len(row["tokens"])
        union += sum("1" in column for column in zip(*bits.values(), strict=True)) if bits else 0
        for name, b in bits.items():
            picked[name] = picked.get(name, 0) + b.count("1")
            s = sums.setdefault(name, [0.0, 0, 0.0, 0])
            for bit, score in zip(b, row.get("scores", {}).get(name, []), strict=False):
                if score is not None and math.isfinite(score):
                    k = 0 if bit == "1" else 2
                    s[k] += score
                    s[k + 1] += 1
        for a, b in itertools.combinations(sorted(bits), 2):
            both = sum(x == y == "1" for x, y in zip(bits[a], bits[b], strict=True))
            either = sum("1" in (x, y) for x, y in zip(bits[a], bits[b], strict=True))
            p = pairs.setdefault(f"{a}_{b}", [0, 0])
            p[0] += both
            p[1] += either
    frac = {name: n / max(tokens, 1) for name, n in picked.items()}
    if picked:
        frac["union"] = union / max(tokens, 1)
    return {"completions": n_rows, "tokens": tokens, "selected": frac,
            "overlap": {k: both / either if either else 0.0 for k, (both, either) in pairs.items()},
            "mean_score": {name: {"selected": s[0] / s[1] if s[1] else None,
                                  "unselected": s[2] / s[3] if s[3] else None} for name, s in sums.items()}}


def _num(x) -> str:
    return "&ndash;" if x is None else f"{x:.3f}"


def summary_html(summary: dict) -> str:
    signals = sorted(summary["mean_score"], key=lambda k: SIGNALS.index(k) if k in SIGNALS else 9)
    rows = "".join(f'<tr><th>{html.escape(k)}</th><td>{_num(summary["selected"].get(k))}</td>'
                   f'<td>{_num(summary["mean_score"].get(k, {}).get("selected"))}</td>'
                   f'<td>{_num(summary["mean_score"].get(k, {}).get("unselected"))}</td></tr>' for k in signals)
    if "union" in summary["selected"]:
        rows += f'<tr><th>union</th><td>{_num(summary["selected"]["union"])}</td><td></td><td></td></tr>'
    overlaps = "".join(f"<tr><th>{html.escape(k.replace('_', ' & '))}</th><td>{_num(v)}</td></tr>"
                       for k, v in summary["overlap"].items())
    return (f'<p class="muted">Run summary over every logged step: {summary["completions"]} completions, '
            f'{summary["tokens"]} tokens.</p>'
            '<table class="summary" id="selection"><tr><th>signal</th><th>fraction selected</th>'
            f'<th>mean score, selected</th><th>mean score, unselected</th></tr>{rows}</table>'
            + (f'<table class="summary" id="overlap"><tr><th>pair</th><th>overlap (Jaccard)</th></tr>{overlaps}'
               '</table>' if overlaps else ""))


def _token_spans(r: dict) -> str:
    spans = []
    for i, token in enumerate(r["tokens"]):
        chosen = [k for k, bits in r["selected"].items() if bits[i] == "1"]
        classes = " ".join(["tok", *(SIGNAL_CLASS.get(k, "") for k in chosen)])
        hover = "; ".join(f"{k}: {v[i]}" for k, v in r.get("scores", {}).items())
        hover += f" | selected: {', '.join(chosen) or 'none'}"
        spans.append(f'<span class="{classes}" title="{html.escape(hover)}">{html.escape(token)}</span>')
    return "".join(spans)


def _frames_html(group: int, media: dict) -> str:
    ids = [f"f{group}_{i}" for i in range(len(media["frames"]))]
    real = "".join(f'<figure><img id="{fid}" src="{f["src"]}" title="{html.escape(f["title"])}" alt="frame {i}">'
                   f'{html.escape(f["label"])}</figure>' for i, (fid, f) in enumerate(zip(ids, media["frames"],
                                                                                         strict=True)))
    out = f'<div class="frames real"><span class="label">frames seen</span>{real}</div>'
    if media.get("order"):
        shown = "".join(f'<figure><img data-ref="{ids[i]}" alt="frame {i}">{html.escape(media["frames"][i]["label"])}'
                        f'</figure>' for i in media["order"])
        note = html.escape(media.get("order_note") or "")
        out += (f'<div class="frames counterfactual" data-order="{",".join(map(str, media["order"]))}">'
                f'<span class="label">temporal counterfactual<br>({note})</span>{shown}</div>')
    return out


def write_attribution_html(records: list[dict], path: str | Path, title: str = "Key tokens",
                           media: dict[str, dict] | None = None, summary: dict | None = None) -> Path:
    """The attribution page. `records` are rows of tokens.jsonl (tokens, selected bitstrings, scores,
    reward, optionally advantage and options); the completions of one prompt (same step and problem)
    are shown together. `media[prompt_key(row)]` (prompt_media) adds the frames the model saw and the
    counterfactual order; `summary` (selection_summary, default: over `records`) heads the page."""
    media = media or {}
    legend = "".join(f'<span class="{c}">{name}</span>' for name, c in SIGNAL_CLASS.items())
    grouped: dict[str, list[dict]] = {}
    for r in records:
        grouped.setdefault(prompt_key(r), []).append(r)
    blocks = []
    for g, (key, rows) in enumerate(grouped.items()):
        first = rows[0]
        options = "".join(f"<li>{html.escape(o)}</li>" for o in first.get("options") or [])
        acc = [r["reward"].get("accuracy", 0.0) for r in rows]
        head = (f'<div class="prompt"><span class="q">{html.escape(first["question"])}</span>'
                + (f'<ul class="options muted">{options}</ul>' if options else "<br>")
                + f'<span class="muted">solution: <b>{html.escape(first["solution"])}</b> &middot; family: '
                f'{html.escape(str(first.get("question_family")))} &middot; step {first.get("step")} &middot; '
                f'{sum(a >= 0.5 for a in acc)}/{len(rows)} correct</span></div>')
        frames = _frames_html(g, media[key]) if key in media else ""
        cards = []
        for r in sorted(rows, key=lambda r: -(r.get("advantage") or 0.0)):
            accuracy = r["reward"].get("accuracy", 0.0)
            verdict = "correct" if accuracy >= 0.5 else "wrong"
            reward = ", ".join(f"{k} {v:g}" for k, v in r["reward"].items())
            advantage = "" if r.get("advantage") is None else f" &middot; advantage <b>{r['advantage']:+.2f}</b>"
            cards.append(f'<div class="sample" data-verdict="{verdict}"><div class="head"><b>{verdict}</b> &middot; '
                         f'reward: {reward}{advantage}</div><div class="tokens">{_token_spans(r)}</div></div>')
        blocks.append(f'<div class="group" data-size="{len(rows)}">{head}{frames}'
                      f'<div class="samples">{"".join(cards)}</div></div>')
    summary = summary if summary is not None else selection_summary(records)
    path = Path(path)
    path.write_text(PAGE.format(title=html.escape(title), legend=legend, summary=summary_html(summary),
                                groups="\n".join(blocks), thumb=THUMB_HEIGHT))
    return path


def tracker_scalars(metrics: dict) -> dict[str, float]:
    """The metrics a tracker can plot: numbers only (lists such as completion_length_by_rank, and
    None values, stay in metrics.jsonl), and no `step`, which trackers get as the x axis."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


TRACKERS = ("tensorboard", "wandb")


def tracker_config(cfg) -> dict[str, bool | int | float | str]:
    """A config dataclass as flat dotted keys with plain values: tensorboard's hparams take nothing else."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v if isinstance(v, bool | int | float | str) else str(v)
        return out

    return flat(dataclasses.asdict(cfg))


def start_trackers(accelerator, cfg, run_name: str, out: Path) -> None:
    """Start the config's trackers (main process): tensorboard event files under out/<run_name>/, and
    wandb offline unless WANDB_MODE says otherwise (nothing leaves the machine; `wandb sync` uploads)."""
    if not cfg.trackers or not accelerator.is_main_process:
        return
    kwargs = {"wandb": {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(out)}} if "wandb" in cfg.trackers \
        else {}
    accelerator.init_trackers(run_name, config=tracker_config(cfg), init_kwargs=kwargs)
