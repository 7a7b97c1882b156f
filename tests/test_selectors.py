"""Training-free frame selectors: AKS (relevance + coverage) and the DPP (relevance + diversity) on hand-built
scores, their config checks, and both end to end through make_selector on the tiny model."""

import itertools

import pytest
import torch

from common.config import ConfigError, load_config
from common.data import load_samples
from common.frames import FramesConfig, make_selector
from common.models import load_model, load_processor
from common.selectors import aks_select, dpp_select
from common.video import read_frames
from common.voyager import select_top, voyager_query


def flat_with(m: int, peaks: dict[int, float], base: float = 0.2) -> torch.Tensor:
    scores = torch.full((m,), base)
    for p, v in peaks.items():
        scores[p] = v
    return scores


def random_similarity(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(m, 8, generator=g, dtype=torch.float64), dim=-1)
    return x @ x.T


@pytest.mark.parametrize("m, num", [(5, 1), (5, 5), (16, 3), (16, 8), (33, 7), (64, 16), (64, 63)])
@pytest.mark.parametrize("method", ["aks", "dpp"])
def test_selection_is_sorted_distinct_in_range_and_deterministic(method, m, num):
    def pick(seed: int) -> list[int]:
        scores = torch.rand(m, generator=torch.Generator().manual_seed(seed))
        return aks_select(scores, num) if method == "aks" else dpp_select(scores, random_similarity(m, seed), num)

    for seed in range(5):
        chosen = pick(seed)
        assert chosen == sorted(chosen) and len(set(chosen)) == num and all(0 <= p < m for p in chosen)
        assert pick(seed) == chosen
    with pytest.raises(ValueError, match="cannot pick"):
        aks_select(torch.rand(m), m + 1) if method == "aks" else dpp_select(torch.rand(m), torch.eye(m), m + 1)


@pytest.mark.parametrize("m, num", [(16, 1), (16, 2), (16, 4), (16, 7), (32, 8), (64, 8)])
def test_aks_picks_the_one_frame_that_matches_the_query(m, num):
    for p in range(m):
        assert p in aks_select(flat_with(m, {p: 0.9}), num)
        noisy = flat_with(m, {p: 0.9}) + 0.01 * torch.rand(m, generator=torch.Generator().manual_seed(p))
        assert p in aks_select(noisy, num)


def test_aks_with_flat_relevance_covers_the_whole_video():
    assert aks_select(torch.full((16,), 0.3), 4) == [0, 4, 8, 12]  # one frame per quarter
    assert aks_select(torch.full((16,), 0.3), 3) == [0, 4, 8]  # the odd frame goes to the first half on a tie
    assert select_top(torch.full((16,), 0.3), 4) == [0, 1, 2, 3]  # what top-T would do: all in the first quarter
    chosen = aks_select(torch.full((32,), 0.3), 8)
    assert sum(p < 16 for p in chosen) == 4 and sum(p >= 16 for p in chosen) == 4
    assert len({p // 4 for p in chosen}) == 8  # every eighth of the video once


def test_aks_takes_top_t_where_relevance_is_concentrated_and_splits_where_it_is_not():
    event = flat_with(16, {4: 0.9, 5: 0.9, 6: 0.9, 7: 0.9})
    assert aks_select(event, 4) == [4, 5, 6, 7]  # clearly above the mean: the event itself
    # The same event with 6 frames to give: the top 6 are no longer clearly above the mean, so the timeline is
    # split; the event's half keeps its frames and the other half is still covered.
    chosen = aks_select(event, 6)
    assert {4, 5, 6, 7} & set(chosen) and any(p >= 8 for p in chosen)
    assert select_top(event, 6) == [0, 1, 4, 5, 6, 7]  # top-T: nothing from the second half
    assert aks_select(event, 6, max_depth=0) == select_top(event, 6)  # no split allowed: plain top-T


def test_aks_threshold_runs_from_top_t_to_full_coverage():
    """threshold 0: every segment with any spread takes its top k (plain top-T); threshold 1: no segment ever
    does, so the split goes on until each frame has its own stretch (one of every two of 16 candidates)."""
    for seed in range(10):
        scores = torch.rand(16, generator=torch.Generator().manual_seed(seed))
        assert aks_select(scores, 8, threshold=0.0) == select_top(scores, 8)
        chosen = aks_select(scores, 8, threshold=1.0)
        assert all(len({2 * i, 2 * i + 1} & set(chosen)) == 1 for i in range(8))


def test_dpp_takes_one_of_two_identical_frames_when_a_diverse_one_exists():
    # Frames 2 and 3 are the same picture, both the best match; frames 0, 1, 4, 5 are different pictures.
    x = torch.eye(6, dtype=torch.float64)
    x[3] = x[2]
    scores = torch.tensor([0.5, 0.4, 0.9, 0.9, 0.6, 0.3])
    for num in (2, 3):
        chosen = dpp_select(scores, x @ x.T, num)
        assert len({2, 3} & set(chosen)) == 1, chosen
    assert dpp_select(scores, x @ x.T, 2) == [2, 4]  # the best match, then the best different picture
    assert select_top(scores, 2) == [2, 3]  # top-T keeps both copies
    assert dpp_select(scores, torch.eye(6), 3) == select_top(scores, 3)  # all different: plain relevance order
    assert len(dpp_select(scores, x @ x.T, 6)) == 6  # the copy is still taken once nothing else is left


def test_dpp_greedy_matches_log_det_recomputed_from_scratch():
    temperature, ridge = 0.5, 1e-3
    for seed, (m, num) in itertools.product(range(4), [(12, 5), (24, 8)]):
        scores = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        S = random_similarity(m, seed)
        q = torch.exp((scores - scores.min()) / (scores.max() - scores.min()) / temperature)
        L = q[:, None] * (S + ridge * torch.eye(m, dtype=torch.float64)) * q[None, :]
        chosen: list[int] = []
        for _ in range(num):
            gains = {j: torch.logdet(L[chosen + [j]][:, chosen + [j]]).item() for j in range(m) if j not in chosen}
            chosen.append(max(gains, key=gains.get))
        assert dpp_select(scores, S, num, temperature, ridge) == sorted(chosen)
    with pytest.raises(ValueError, match="similarity"):
        dpp_select(torch.rand(4), torch.eye(3), 2)


@pytest.mark.parametrize("strategy", ["aks", "dpp"])
def test_config_checks_name_the_key(strategy, tiny_model_dir, tiny_world_dir):
    with pytest.raises(ConfigError, match=r"frames\.num: T=20 must be <= frames\.candidates M=16"):
        FramesConfig(strategy=strategy, num=20, candidates=16).validate()
    import eval as eval_stage

    cfg = load_config(eval_stage.Config, None, [f"model={tiny_model_dir}", f"data={tiny_world_dir / 'test.json'}",
                                                f"frames.strategy={strategy}", "frames.candidates=32"])
    assert cfg.frames.strategy == strategy
    with pytest.raises(ConfigError, match="frames.strategy"):
        load_config(eval_stage.Config, None, ["frames.strategy=akss"], validate=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)


@pytest.mark.parametrize("strategy", ["aks", "dpp"])
def test_selector_end_to_end_on_the_tiny_model(tiny, tiny_world_dir, strategy):
    model, processor = tiny
    select = make_selector(FramesConfig(strategy=strategy, candidates=12, num=4), model, processor)
    for sample in load_samples(tiny_world_dir / "test.json")[:2]:
        candidates = read_frames(sample.path, num_frames=12)
        clip = select(sample)
        positions = [candidates.indices.index(i) for i in clip.indices]  # raises if not a candidate
        assert len(clip.indices) == 4 and positions == sorted(set(positions))
        assert clip.timestamps == [candidates.timestamps[p] for p in positions]  # true times, not renumbered
        assert (clip.frames == candidates.frames[positions]).all()
        if strategy == "aks":
            scores = select.frame_scores(candidates, voyager_query(sample.problem, sample.options))
            assert positions == aks_select(scores, 4)
        assert select(sample).indices == clip.indices  # deterministic
