"""The results collector's token analysis and the attribution page, on hand-made rows."""

import shutil

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


def test_token_table_gives_each_signals_share_of_grpos_gradient_from_the_metrics(tmp_path):
    """RESULTS.md's token table reads each signal's gradient share from KTR's metrics.jsonl (mean over steps);
    a run logged before the metric existed leaves the column empty rather than failing."""
    from common.jsonl import append_jsonl
    from common.results import collect, markdown

    (tmp_path / "ktr").mkdir()
    append_jsonl(tmp_path / "ktr" / "tokens.jsonl", [ROW])
    page = markdown(collect(tmp_path), [])
    assert "| share of GRPO's gradient |" in page and "| union | 0.300 |" in page
    assert next(line for line in page.splitlines() if line.startswith("| union |")).endswith("|  |")
    append_jsonl(tmp_path / "ktr" / "metrics.jsonl", [
        {"step": 1, "gradient_share/visual": 0.5, "gradient_share/union": 0.9},
        {"step": 2, "gradient_share/visual": 0.7, "gradient_share/union": 1.0}])
    results = collect(tmp_path)
    assert results["ktr_tokens"]["visual"]["gradient_kept"] == pytest.approx(0.6)
    assert results["ktr_tokens"]["union"]["gradient_kept"] == pytest.approx(0.95)
    assert "gradient_kept" not in results["ktr_tokens"]["entropy"]  # not logged: no value made up
    lines = markdown(results, []).splitlines()
    assert next(line for line in lines if line.startswith("| union |")).endswith("| 0.950 |")


def test_attribution_page_marks_each_selected_token_and_escapes_text(tmp_path):
    row = dict(ROW, question="Is 1 < 2?")
    page = write_attribution_html([row], tmp_path / "a.html").read_text()
    assert "Is 1 &lt; 2?" in page and "&lt;answer&gt;" in page
    assert page.count('class="tok v"') == 2  # two visual tokens (signals are marked by class since issue 13)
    assert "visual: 1.5" in page and "selected: visual" in page


def write_eval(out, name, accuracy, families):
    from common.jsonl import write_json

    (out / "eval" / name).mkdir(parents=True)
    write_json(out / "eval" / name / "summary.json", {
        "accuracy": accuracy, "n": 400, "n_failed": 0,
        "by_source": {"question_family": {f: {"n": 100, "accuracy": a} for f, a in families.items()}}})


def test_seed_table_means_spread_and_paired_interval_to_grpo(tmp_path):
    """Three seeds of GRPO and KTR plus one ablation row: means, std, the paired KTR - GRPO differences
    with a t interval, the selected fractions from training, and the paper's column in the Markdown."""
    from common.jsonl import append_jsonl
    from common.results import collect, markdown

    grpo, ktr = [0.40, 0.44, 0.42], [0.43, 0.45, 0.47]
    for seed, (g, k) in enumerate(zip(grpo, ktr, strict=True)):
        suffix = f"_seed{seed}" if seed else ""
        write_eval(tmp_path, f"grpo{suffix}_uniform", g, {"count": g + 0.1})
        write_eval(tmp_path, f"ktr{suffix}_uniform", k, {"count": k + 0.1})
        (tmp_path / f"ktr{suffix}").mkdir()
        append_jsonl(tmp_path / f"ktr{suffix}" / "metrics.jsonl",
                     [{"step": 1, "reward": 0.3, "selected/union": 0.5, "selected/visual": 0.2,
                       "gradient_share/union": 0.8 + seed / 100},
                      {"step": 2, "reward": 0.5, "selected/union": 0.7, "selected/visual": 0.2,
                       "gradient_share/union": 0.9 + seed / 100}])
    write_eval(tmp_path, "ktr_visual_uniform", 0.41, {"count": 0.5})
    write_eval(tmp_path, "sft_uniform", 0.45, {"count": 0.6})  # not an RL run: not in the seed table
    seeds = collect(tmp_path)["seeds"]
    assert set(seeds["runs"]) == {"grpo", "ktr", "ktr_visual"}
    assert seeds["runs"]["grpo"]["accuracy"]["mean"] == pytest.approx(0.42)
    assert seeds["runs"]["grpo"]["accuracy"]["std"] == pytest.approx(0.02)
    assert seeds["runs"]["ktr"]["selected"] == {"union": pytest.approx(0.6), "visual": pytest.approx(0.2)}
    assert seeds["runs"]["ktr"]["gradient_kept"] == pytest.approx(0.86)  # steps' mean, then the seeds' mean
    assert "gradient_kept" not in seeds["runs"]["grpo"]
    paired = seeds["paired"]["ktr - grpo"]
    assert paired["per_seed"] == pytest.approx([0.03, 0.01, 0.05]) and paired["mean"] == pytest.approx(0.03)
    # t(0.975, 2 dof) = 4.303, sd of the differences 0.02: half-width 4.303 * 0.02 / sqrt(3)
    assert paired["ci95"] == pytest.approx([0.03 - 4.303 * 0.02 / 3 ** 0.5, 0.03 + 4.303 * 0.02 / 3 ** 0.5])
    assert seeds["paired"]["ktr_visual - grpo"]["n"] == 1 and seeds["paired"]["ktr_visual - grpo"]["ci95"] is None
    page = markdown(collect(tmp_path), [])
    assert "| all three (KTR) | 3 | 0.450 ± 0.020 |" in page and "| 53.4 |" in page and "ktr - grpo" in page
    assert "| GRPO's gradient kept | paper |" in page and "| 0.200 | 0.600 | 0.860 | 53.4 |" in page
    header = next(line for line in page.splitlines() if line.startswith("| run | seeds |"))
    rule = page.splitlines()[page.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|")  # a well-formed table
    assert "(test split, greedy, 8 uniform frames)" in page and "RL_FRAMES" not in page


def test_the_voyager_scorers_ranking_is_read_from_its_summary(tmp_path):
    """RESULTS.md reports the scorer's last-epoch validation ranking (train_voyager.py's summary.json)."""
    from common.jsonl import write_json
    from common.results import collect, markdown

    (tmp_path / "voyager").mkdir()
    write_json(tmp_path / "voyager" / "summary.json", {
        "train_samples": 90, "val_samples": 10, "median_val_gap": 0.0042, "spec": {"coverage": True},
        "final": {"epoch": 3, "pair_accuracy": 0.61, "pair_accuracy_large_gap": 0.72, "spearman": 0.33,
                  "evidence_recall_voyager": 0.9, "evidence_recall_uniform": 0.8, "evidence_recall_label_best": 0.85}})
    results = collect(tmp_path)
    assert results["voyager"]["pair_accuracy_large_gap"] == 0.72 and results["voyager"]["coverage"] is True
    page = markdown(results, [])
    assert "| 0.610 | 0.720 | 0.330 | 0.900 | 0.800 | 0.850 |" in page
    assert "Trained on 90 labeled samples, validated on 10 (with the coverage head)" in page and "0.004 nats" in page
    shutil.rmtree(tmp_path / "voyager")
    assert "voyager" not in collect(tmp_path) and "Voyager scorer" not in markdown(collect(tmp_path), [])


def test_runs_on_voyager_frames_pair_with_grpo_on_the_same_frames(tmp_path):
    """run.sh RL_FRAMES=voyager: grpo_voyager / ktr_voyager, judged on Voyager's frames (eval/<run>_voyager), are
    seed-table rows paired with each other, never with uniform GRPO; an evaluation on other frames than the run
    trained on (uniform GRPO on Voyager's frames, a Voyager run on uniform frames) is not a seed-table entry."""
    from common.results import collect, markdown

    write_eval(tmp_path, "grpo_uniform", 0.40, {"count": 0.5})
    write_eval(tmp_path, "ktr_uniform", 0.41, {"count": 0.5})
    for seed, (g, k) in enumerate([(0.60, 0.62), (0.58, 0.57)]):
        suffix = f"_seed{seed}" if seed else ""
        write_eval(tmp_path, f"grpo_voyager{suffix}_voyager", g, {"count": g})
        write_eval(tmp_path, f"ktr_voyager{suffix}_voyager", k, {"count": k})
    write_eval(tmp_path, "grpo_voyager", 0.99, {"count": 0.99})  # uniform GRPO judged on Voyager's frames
    write_eval(tmp_path, "ktr_voyager_uniform", 0.01, {"count": 0.01})  # a Voyager run judged on uniform frames
    seeds = collect(tmp_path)["seeds"]
    assert set(seeds["runs"]) == {"grpo", "ktr", "grpo_voyager", "ktr_voyager"}
    assert seeds["runs"]["grpo"]["per_seed"] == {"0": 0.40}
    assert seeds["runs"]["ktr_voyager"]["per_seed"] == {"0": 0.62, "1": 0.57}
    assert set(seeds["paired"]) == {"ktr - grpo", "ktr_voyager - grpo_voyager"}
    assert seeds["paired"]["ktr_voyager - grpo_voyager"]["per_seed"] == pytest.approx([0.02, -0.01])
    page = markdown(collect(tmp_path), [])
    assert "| KTR on Voyager's frames | 2 | 0.595 ± 0.035 |" in page and "RL_FRAMES=voyager" in page
    assert "(test split, greedy, 8 frames: uniform, Voyager's for the *_voyager runs)" in page
    # one seed of each on Voyager's frames alone still gets the seed table (more than the default pair)
    for seed_dir in ("grpo_voyager_seed1_voyager", "ktr_voyager_seed1_voyager", "grpo_uniform", "ktr_uniform"):
        shutil.rmtree(tmp_path / "eval" / seed_dir)
    assert set(collect(tmp_path)["seeds"]["runs"]) == {"grpo_voyager", "ktr_voyager"}


def test_family_accuracy_bins_steps_and_training_curves_are_drawn(tmp_path):
    """Per-family sampled accuracy in tenths of the run, and the curves of GRPO / KTR over two seeds."""
    from common.jsonl import append_jsonl
    from common.results import family_accuracy, plots

    rows = [{"step": s, "question_family": f, "reward": {"accuracy": float(s > 10 and f == "count")},
             "tokens": ["<answer>", "A"], "selected": {"visual": "01"}}
            for s in range(1, 21) for f in ("count", "order")]
    centers, by_family = family_accuracy(rows)
    assert centers == [1.5 + 2 * b for b in range(10)]  # 20 steps: bins of 2 steps
    assert by_family["count"] == [0.0] * 5 + [1.0] * 5 and by_family["order"] == [0.0] * 10
    for run in ("grpo", "grpo_seed1", "ktr", "ktr_seed1", "ktr_visual"):
        (tmp_path / run).mkdir()
        append_jsonl(tmp_path / run / "metrics.jsonl", [
            {"step": s, "reward": 1 + s / 20, "accuracy": s / 20, "kl": 0.01 * s, "completion_length": 30 + s,
             "all_correct_groups": 0.1, "all_wrong_groups": 0.2, "selected/union": 0.4, "selected/visual": 0.2,
             "selected/temporal": None if s == 3 else 0.2, "gradient_share/union": 0.8} for s in range(1, 21)])
        append_jsonl(tmp_path / run / "tokens.jsonl", rows)
    assert plots(tmp_path) == ["training_curves.png"]
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    # frame-selection rows add the per-family accuracy / evidence recall figure, M = 32 rows included
    for name in ("sft_uniform", "sft_voyager_m16", "sft_voyager_m32"):
        write_eval(tmp_path, name, 0.4, {"count": 0.5, "order": 0.3})
    assert plots(tmp_path) == ["training_curves.png", "frame_selection.png"]
    assert (tmp_path / "frame_selection.png").stat().st_size > 10_000
