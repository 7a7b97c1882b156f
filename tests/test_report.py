"""The attribution page's structure, read back with the stdlib's HTML parser, and the tracker scalars."""

from html.parser import HTMLParser

import numpy as np
import pytest

from common.report import prompt_key, prompt_media, selection_summary, tracker_scalars, write_attribution_html


class PageParser(HTMLParser):
    """Groups of the attribution page: their frames, counterfactual order and completions' tokens."""

    def __init__(self):
        super().__init__()
        self.groups, self.tables, self.table = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "table":
            self.table = self.tables.setdefault(a.get("id"), [])
        if "group" in classes:
            self.groups.append({"size": int(a["data-size"]), "frames": [], "order": None, "refs": [], "samples": []})
        elif "counterfactual" in classes:
            self.groups[-1]["order"] = [int(x) for x in a["data-order"].split(",")]
        elif tag == "img" and "src" in a:
            self.groups[-1]["frames"].append(a["src"])
        elif tag == "img" and "data-ref" in a:
            self.groups[-1]["refs"].append(a["data-ref"])
        elif "sample" in classes:
            self.groups[-1]["samples"].append({"verdict": a["data-verdict"], "tokens": []})
        elif "tok" in classes:
            self.groups[-1]["samples"][-1]["tokens"].append({"title": a["title"], "signals": set(classes) - {"tok"}})

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.table is not None and data.strip():  # the header tables' cells, in reading order
            self.table.append(data.strip())


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def check_page(text: str, group_size: int, n_frames: int, signals: set[str]) -> PageParser:
    """Every group has G completions and its frames (data: URIs); every token its scores for each signal."""
    page = parse_page(text)
    assert page.groups
    for g in page.groups:
        assert g["size"] == len(g["samples"]) == group_size
        assert len(g["frames"]) == n_frames and all(src.startswith("data:image/") for src in g["frames"])
        if g["order"] is not None:  # the counterfactual row re-uses the thumbnails, in the shuffled order
            assert sorted(g["order"]) == list(range(n_frames)) and len(g["refs"]) == n_frames
        for s in g["samples"]:
            assert s["verdict"] in ("correct", "wrong") and s["tokens"]
            for tok in s["tokens"]:
                assert all(f"{k}: " in tok["title"] for k in signals), tok
    for table in ("selection", "overlap"):
        assert table in page.tables
    return page


def rows_for(step: int, problem: str, accuracies: list[float]) -> list[dict]:
    return [{"step": step, "problem_id": problem, "question": "Is 1 < 2?", "question_family": "count",
             "solution": "<answer>A</answer>", "options": ["A. yes", "B. no"], "reward": {"accuracy": a},
             "advantage": a - 0.5, "tokens": ["<answer>", "A", "</answer>"],
             "selected": {"visual": "010", "temporal": "011"},
             "scores": {"visual": [0.1, 2.0, 0.0], "temporal": [None, 1.0, 3.0]}} for a in accuracies]


def test_page_groups_completions_embeds_frames_and_summarises(tmp_path):
    class Clip:  # the fields of common.video.Clip the page reads
        frames = np.random.default_rng(0).integers(0, 255, (4, 32, 48, 3), dtype=np.uint8)
        timestamps = [0.0, 0.5, 1.0, 1.5]
        indices = [0, 4, 8, 12]

    rows = rows_for(1, "p1", [1.0, 0.0, 0.0]) + rows_for(2, "p2", [0.0, 1.0, 1.0])
    media = {prompt_key(rows[0]): prompt_media(Clip(), order=[2, 3, 0, 1], order_note="patches shuffled"),
             prompt_key(rows[3]): prompt_media(Clip())}
    text = write_attribution_html(rows, tmp_path / "a.html", media=media).read_text()
    page = check_page(text, group_size=3, n_frames=4, signals={"visual", "temporal"})
    assert [g["order"] for g in page.groups] == [[2, 3, 0, 1], None]
    assert [s["verdict"] for s in page.groups[0]["samples"]] == ["correct", "wrong", "wrong"]  # by advantage
    assert "Is 1 &lt; 2?" in text and "0.5s" in text and "advantage <b>+0.50</b>" in text
    # the header: 6 completions of 3 tokens; visual picked 1 of 3, temporal 2 of 3, union 2 of 3
    cells = page.tables["selection"][4:]  # after the column names
    assert cells[:4] == ["visual", "0.333", "2.000", "0.050"]
    assert cells[4:8] == ["temporal", "0.667", "2.000", "\u2013"]  # no finite unselected score
    assert cells[8:] == ["union", "0.667"]
    assert page.tables["overlap"][2:] == ["temporal & visual", "0.500"]


def test_selection_summary_counts_union_overlap_and_mean_scores():
    s = selection_summary(rows_for(1, "p", [1.0, 0.0]))
    assert s["tokens"] == 6 and s["completions"] == 2
    assert s["selected"] == pytest.approx({"visual": 1 / 3, "temporal": 2 / 3, "union": 2 / 3})
    assert s["overlap"] == {"temporal_visual": 0.5}
    assert s["mean_score"]["visual"] == {"selected": 2.0, "unselected": pytest.approx(0.05)}
    assert s["mean_score"]["temporal"] == {"selected": 2.0, "unselected": None}


def test_tracker_scalars_drop_lists_none_and_step():
    metrics = {"step": 3, "loss": 0.5, "grad_norm": None, "completion_length_by_rank": [8, 13], "rounds": 2,
               "flag": True, "nan": float("nan")}
    assert tracker_scalars(metrics) == {"loss": 0.5, "rounds": 2.0}
