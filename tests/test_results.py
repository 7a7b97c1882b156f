"""The results collector's token analysis and the attribution page, on hand-made rows."""

import pytest

from common.report import write_attribution_html
from common.results import token_informativeness

ROW = {
    "step": 1, "question": "What colour is the circle?", "question_family": "appearance",
    "solution": "<answer>A</answer>", "reward": {"accuracy": 1.0},
    # text: "<think>The circle is red.</think><answer>A</answer>"
    "tokens": ["<think>", "The", " circle", " is", " red", ".", "</think>", "<answer>", "A", "</answer>"],
    "selected": {"visual": "0000100010", "entropy": "0010000000"},
    "scores": {"visual": [0.1, 0.0, 0.2, 0.0, 1.5, 0.0, 0.0, 0.0, 0.9, None]},
}


def test_token_informativeness_counts_answer_and_informative_shares():
    out = token_informativeness([ROW], ["red", "circle", "A"])
    # visual picked " red" (informative, outside the answer) and "A" (informative, inside the answer)
    assert out["visual"] == {"selected_fraction": 0.2, "share_in_answer": 0.5, "share_informative": 1.0}
    assert out["entropy"]["share_informative"] == 1.0 and out["entropy"]["share_in_answer"] == 0.0
    assert out["union"]["selected_fraction"] == pytest.approx(0.3)
    # base rate: 3 informative tokens of 10, 1 inside <answer>
    assert out["all_tokens"] == {"share_in_answer": 0.1, "share_informative": 0.3}


def test_attribution_page_marks_each_selected_token_and_escapes_text(tmp_path):
    row = dict(ROW, question="Is 1 < 2?")
    page = write_attribution_html([row], tmp_path / "a.html").read_text()
    assert "Is 1 &lt; 2?" in page and "&lt;answer&gt;" in page
    assert page.count("border-bottom: 3px solid") == 2 + 1  # two visual tokens + the legend
    assert "visual: 1.5" in page and "selected: visual" in page
