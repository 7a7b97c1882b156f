"""common.label_stats on hand-built labels: a loss that separates evidence combinations perfectly, a constant
loss, an additive per-frame loss, count evidence with object tracks, and the CLI end to end."""

import json
import math
import random
from itertools import combinations

import numpy as np
import pytest

from common.label_stats import (
    additive_fit,
    candidate_membership,
    label_report,
    main,
    random_hit_probability,
    sample_stats,
    separation_auc,
)

M, T = 8, 4
CANDIDATES = [4 * i + 2 for i in range(M)]  # frames 2, 6, ..., 30 of a 32-frame video
COMBOS = [list(c) for c in combinations(range(M), T)]  # all 70


def record(losses, family="moment", evidence=(14, 15), pid=0) -> dict:
    return {"problem_id": pid, "question_family": family, "evidence_frames": list(evidence),
            "candidate_indices": CANDIDATES, "total_frames": 32, "combinations": COMBOS,
            "losses": [float(x) for x in losses]}


def has_frame(position: int) -> list[bool]:
    return [position in c for c in COMBOS]


def test_a_loss_that_separates_the_evidence_scores_one():
    # Evidence = frame 14 = candidate 3: every combination with it has a lower loss, with some spread.
    rng = random.Random(0)
    losses = [(0.2 if hit else 1.0) + 0.1 * rng.random() for hit in has_frame(3)]
    s = sample_stats(record(losses))
    assert s["cand"] == 1.0 and s["best"] == 1.0
    assert s["auc"] == 1.0 and s["d_sd"] > 1.5
    assert s["has"] == pytest.approx(T / M) and s["rand"] == pytest.approx(T / M)
    assert s["contrast"] == pytest.approx(35 * 35 / (70 * 69 / 2))  # pairs that differ in evidence
    # The evidence oracle orders every contrast pair and ties (1/2) the pairs where both or neither hit.
    assert s["oracle"] == pytest.approx(1.0 * s["contrast"] + 0.5 * (1 - s["contrast"]))
    # A per-frame fit finds that frame, but the within-group noise is not per-frame: it ranks as the oracle.
    assert s["additive"] == pytest.approx(s["oracle"], abs=0.03)


def test_a_loss_that_prefers_the_missing_evidence_scores_zero():
    losses = [(1.0 if hit else 0.2) + 0.01 * i for i, hit in enumerate(has_frame(3))]
    s = sample_stats(record(losses))
    assert s["auc"] == 0.0 and s["best"] == 0.0 and s["d_sd"] < 0
    assert s["oracle"] == pytest.approx(0.5 * (1 - s["contrast"]))


def test_constant_losses_have_no_pairs_and_no_separation():
    s = sample_stats(record([0.7] * len(COMBOS)))
    assert s["pairs"] == 0 and s["spread"] == 0.0 and s["gap"] is None
    assert s["auc"] == 0.5 and s["oracle"] is None and s["additive"] is None


def test_near_constant_losses_are_all_near_ties_without_separation():
    rng = np.random.default_rng(0)
    losses = 0.7 + 1e-4 * rng.standard_normal(len(COMBOS))
    s = sample_stats(record(losses), tie=0.01)
    assert s["pairs"] == len(COMBOS) * (len(COMBOS) - 1) // 2
    assert s["tie"] == 1.0 and s["gap"] < 1e-3
    assert abs(s["auc"] - 0.5) < 0.15 and abs(s["oracle"] - 0.5) < 0.15
    assert abs(s["additive"] - 0.5) < 0.1  # noise: no per-frame structure to find


def test_margin_drops_the_close_pairs():
    losses = [float(i % 2) + 1e-3 * i for i in range(len(COMBOS))]
    assert sample_stats(record(losses))["pairs"] == len(COMBOS) * (len(COMBOS) - 1) // 2
    assert sample_stats(record(losses), margin=0.5)["pairs"] == 35 * 35  # only odd vs even remain


def test_additive_fit_recovers_per_frame_effects():
    effects = np.random.default_rng(1).normal(size=M)
    combos = np.array(COMBOS)
    losses = effects[combos].sum(1)
    acc, residual = additive_fit(combos, losses, M, ridge=1e-6)
    assert acc > 0.99 and residual < 1e-4
    # The interaction of two frames is not additive: the fit leaves a residual.
    xor = np.array([float((0 in c) != (1 in c)) for c in COMBOS])
    _, residual = additive_fit(combos, xor, M)
    assert residual > 0.2


def test_random_hit_probability_is_exact():
    member = candidate_membership(record([0] * len(COMBOS)), [{14, 15}])  # one candidate of 8
    assert random_hit_probability(member, T) == pytest.approx(1 - math.comb(7, 4) / math.comb(8, 4))
    two = np.zeros((2, M), bool)
    two[0, 0] = two[1, 1] = True  # need candidate 0 and candidate 1: C(6, 2) / C(8, 4)
    assert random_hit_probability(two, T) == pytest.approx(math.comb(6, 2) / math.comb(8, 4))
    # Brute force over all subsets agrees.
    brute = np.mean([two[:, list(c)].any(1).all() for c in combinations(range(M), T)])
    assert random_hit_probability(two, T) == pytest.approx(brute)


def test_count_evidence_with_object_tracks_needs_every_object():
    rec = record([0.5] * len(COMBOS), family="count", evidence=range(0, 32))
    assert sample_stats(rec)["has"] == 1.0  # any frame shows a shape: every combination "hits"
    objects = [{"start": 0, "end": 8}, {"start": 24, "end": 32}]  # candidates 0-1 and 6-7
    s = sample_stats(rec, objects)
    brute = np.mean([bool({0, 1} & set(c)) and bool({6, 7} & set(c)) for c in COMBOS])
    assert s["has"] == pytest.approx(brute) and s["rand"] == pytest.approx(brute)


def test_evidence_out_of_reach_of_the_candidates():
    s = sample_stats(record(np.arange(len(COMBOS)) / 70, evidence=[3]))  # frame 3: no candidate
    assert s["cand"] == 0.0 and s["has"] == 0.0 and s["rand"] == 0.0 and s["best"] == 0.0
    assert s["auc"] is None and s["contrast"] == 0.0 and s["oracle"] == 0.5


def test_separation_auc_counts_ties_half():
    assert separation_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert separation_auc(np.array([1.0, 2.0, 3.0]), np.array([True, True, True])) is None


def test_report_per_family_and_overall():
    good = [(0.2 if hit else 1.0) + 0.01 * i for i, hit in enumerate(has_frame(3))]
    flat = [0.7] * len(COMBOS)
    report = label_report([record(good, "moment", pid=0), record(flat, "appearance", pid=1)])
    assert list(report) == ["appearance", "moment", "all"]
    assert report["moment"]["auc"] == 1.0 and report["appearance"]["auc"] == 0.5
    assert report["all"]["n"] == 2 and report["all"]["auc"] == 0.75
    assert report["all"]["best"] == pytest.approx(np.mean([1.0, report["appearance"]["best"]]))


def test_cli_prints_tables_and_reads_voyager_metrics(tmp_path, capsys):
    good = [(0.2 if hit else 1.0) + 0.01 * i for i, hit in enumerate(has_frame(3))]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps(record(good, pid=5)) + "\n")
    # The data file is authoritative for family and evidence: here it moves the evidence off the candidates.
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"problem_id": 5, "question_family": "order", "evidence_frames": [3]}]))
    voyager = tmp_path / "voyager"
    voyager.mkdir()
    rows = [{"epoch": 0, "train_loss": None, "pair_accuracy": 0.5, "spearman": 0.0},
            {"epoch": 1, "train_loss": 0.69, "pair_accuracy": 0.52, "spearman": 0.03},
            {"epoch": 2, "train_loss": 0.68, "pair_accuracy": 0.51, "spearman": 0.02}]
    (voyager / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "stats.json"
    main(["--labels", str(labels), "--data", str(data), "--voyager", str(voyager), "--json", str(out)])
    text = capsys.readouterr().out
    assert "1. labels vs evidence" in text and "2. pairs" in text and "3. scorer (2 epochs)" in text
    assert "0.6800" in text  # the lowest training loss
    numbers = json.loads(out.read_text())
    assert list(numbers["labels"]) == ["order", "all"]
    assert numbers["labels"]["order"]["cand"] == 0.0
    assert numbers["voyager"]["last"]["pair_accuracy"] == 0.51
