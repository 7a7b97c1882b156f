"""Readable artefacts: the token-attribution page (a single HTML file, no server needed)."""

from __future__ import annotations

import html
from pathlib import Path

SIGNAL_STYLE = {  # each signal draws its own mark, so a token selected by several shows all of them
    "visual": "border-bottom: 3px solid #1f77b4;",
    "temporal": "border-top: 3px solid #ff7f0e;",
    "entropy": "background: #c7e9c0;",
}

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
.sample {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }}
.meta {{ color: #555; font-size: 0.9em; margin-bottom: 0.5em; }}
.tokens {{ font-family: ui-monospace, monospace; line-height: 2.1; white-space: pre-wrap; }}
.tok {{ padding: 0 1px; }} .tok:hover {{ outline: 1px solid #999; }}
.legend span {{ margin-right: 1.5em; padding: 0 4px; }}
</style></head><body><h2>{title}</h2>
<p class="legend">Selected by: {legend} &mdash; hover a token for its scores.</p>
{samples}</body></html>"""


def write_attribution_html(records: list[dict], path: str | Path, title: str = "Key tokens") -> Path:
    """One block per completion: question, answer, reward, and every token marked by the signals
    that selected it. `records` are rows of tokens.jsonl (tokens, selected bitstrings, scores)."""
    legend = "".join(f'<span style="{style}">{name}</span>' for name, style in SIGNAL_STYLE.items())
    blocks = []
    for r in records:
        spans = []
        for i, token in enumerate(r["tokens"]):
            chosen = [k for k, bits in r["selected"].items() if bits[i] == "1"]
            style = "".join(SIGNAL_STYLE.get(k, "") for k in chosen)
            hover = "; ".join(f"{k}: {v[i]}" for k, v in r.get("scores", {}).items())
            hover += f" | selected: {', '.join(chosen) or 'none'}"
            spans.append(f'<span class="tok" style="{style}" title="{html.escape(hover)}">{html.escape(token)}</span>')
        reward = ", ".join(f"{k} {v:g}" for k, v in r["reward"].items())
        blocks.append(
            f'<div class="sample"><div class="meta"><b>{html.escape(r["question"])}</b><br>'
            f'family: {html.escape(str(r.get("question_family")))} &middot; solution: {html.escape(r["solution"])}'
            f' &middot; reward: {reward} &middot; step {r["step"]}</div>'
            f'<div class="tokens">{"".join(spans)}</div></div>')
    path = Path(path)
    path.write_text(PAGE.format(title=html.escape(title), legend=legend, samples="\n".join(blocks)))
    return path

