"""Frame-Voyager: ranking loss and top-T selection on hand-computed values, the backbone features, the
save/load round trip with its backbone check, and label -> train -> eval.py (voyager and retrieval)."""

import copy
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from common.data import load_samples
from common.jsonl import read_jsonl
from common.launch import cpu_launch_env, launch_command
from common.models import (
    chat_text,
    embed_visual,
    encode_visual,
    load_model,
    load_processor,
    position_ids,
    video_format,
    video_max_pixels,
    visual_layout,
    visual_tokens,
)
from common.video import read_frames
from common.voyager import (
    VoyagerHeads,
    VoyagerSpec,
    backbone_features,
    backbone_fingerprint,
    bottom_layers,
    combination_scores,
    evenness,
    load_voyager,
    own_patch_inputs,
    ranking_loss,
    save_voyager,
    select_frames,
    select_top,
    subclip,
)
from tests.conftest import ROOT, TINY_ARCH_FIXTURES


def softplus(x):
    return math.log1p(math.exp(x))


def test_ranking_loss_matches_hand_computed_pairs():
    scores = torch.tensor([2.0, 1.0, 0.0])
    losses = torch.tensor([0.1, 0.5, 0.3])  # best: 0, then 2, then 1
    # pairs (better, worse): (0, 1) diff 1, (0, 2) diff 2, (2, 1) diff -1
    want = (softplus(-1.0) + softplus(-2.0) + softplus(1.0)) / 3
    assert ranking_loss(scores, losses).item() == pytest.approx(want, rel=1e-6)
    # with a margin of 0.25 only (0, 1) differs enough in label loss
    assert ranking_loss(scores, losses, margin=0.25).item() == pytest.approx(softplus(-1.0), rel=1e-6)
    flat = torch.tensor([1.0, 2.0], requires_grad=True)
    zero = ranking_loss(flat, torch.tensor([0.3, 0.3]))
    zero.backward()
    assert zero.item() == 0.0 and flat.grad is not None


def test_validation_pair_accuracy_overall_and_on_the_larger_gap_half():
    """Four one-frame combinations with label losses 0, 0.1, 1, 3 and fixed frame rewards 4, 3, 1, 2: of the six
    ranked pairs only (2, 3) is ordered wrongly (5/6). The median gap is 1.0 (gaps 0.1, 0.9, 1, 2, 2.9, 3), so
    the larger-gap half is the three pairs with frame 3, where (2, 3) is one of three (2/3)."""
    from train_voyager import Item, median_gap, summarize, validate

    losses = [0.0, 0.1, 1.0, 3.0]
    rewards = torch.tensor([4.0, 3.0, 1.0, 2.0])
    assert median_gap([{"losses": losses}], margin=0.0) == pytest.approx(1.0)
    assert median_gap([{"losses": losses}], margin=0.95) == pytest.approx(2.0)  # of 1, 2, 2.9, 3 (lower median)
    item = Item(frames=torch.zeros(4, 1, 1), query=torch.zeros(1, 1), combinations=torch.tensor([[0], [1], [2], [3]]),
                losses=torch.tensor(losses), candidate_indices=[0, 1, 2, 3], total_frames=4, evidence=None)
    sums = validate(lambda frames, query: (rewards, None), [item], 0.0, 1, "cpu", large_gap=1.0)
    out = summarize(sums)
    assert sums["pairs"] == 6 and sums["pairs_large_gap"] == 3
    assert out["pair_accuracy"] == pytest.approx(5 / 6) and out["pair_accuracy_large_gap"] == pytest.approx(2 / 3)
    # The margin selects the pairs of the overall accuracy only: the larger-gap pairs stay the same.
    sums = validate(lambda frames, query: (rewards, None), [item], 0.95, 1, "cpu", large_gap=1.0)
    assert sums["pairs"] == 4 and sums["pairs_large_gap"] == 3 and sums["correct"] == 3
    assert not any(key.startswith("pair_accuracy_m") for key in out)  # one M: no per-M split
    # Labels at two M (mixed_candidates): the pairs of each M apart, and together the overall accuracy.
    wide = Item(frames=torch.zeros(8, 1, 1), query=torch.zeros(1, 1), combinations=torch.tensor([[0], [1], [2]]),
                losses=torch.tensor([0.0, 1.0, 2.0]), candidate_indices=list(range(8)), total_frames=8, evidence=None)
    wide_rewards = torch.tensor([1.0, 2.0, 3.0, 0, 0, 0, 0, 0])  # every one of its 3 pairs ordered wrongly
    heads = lambda frames, query: (rewards if len(frames) == 4 else wide_rewards, None)  # noqa: E731
    out = summarize(validate(heads, [item, wide], 0.0, 1, "cpu", sizes=[4, 8, 4]))
    assert out["pair_accuracy_m4"] == pytest.approx(5 / 6) and out["pair_accuracy_m8"] == 0.0
    assert out["pair_accuracy"] == pytest.approx(5 / 9)


@pytest.mark.parametrize("token_pool,coverage", [("mean", False), ("max", False), ("mean", True)])
def test_batched_training_loss_equals_one_sample_at_a_time(token_pool, coverage):
    """train_voyager's one padded forward for a batch gives the loss and the gradients of a forward and a ranking
    loss per sample: samples with different numbers of candidates, tokens per frame, query tokens and labeled
    combinations, one whose losses are all equal (no pair qualifies), with a margin and a combination subsample."""
    import random

    from train_voyager import Item, batch_loss, per_sample_loss

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 5, 12), (6, 2, 9, 7), (8, 4, 3, 20), (5, 3, 6, 4)]  # (M, P, Lq, K)
    batch = []
    for n, (m, p, lq, k) in enumerate(shapes):
        combos = torch.stack([torch.randperm(m, generator=g)[:3].sort().values for _ in range(k)])
        losses = torch.full((k,), 1.5) if n == 3 else torch.rand(k, generator=g)
        batch.append(Item(torch.randn(m, p, 16, generator=g), torch.randn(lq, 16, generator=g), combos, losses,
                          list(range(m)), 64, None))
    heads = VoyagerHeads(16, 8, token_pool, coverage)
    if coverage:  # away from its zero start, so that the evenness term counts
        torch.nn.init.normal_(heads.coverage_head.weight, generator=g)
    grads = []
    for fn in (batch_loss, per_sample_loss):
        heads.zero_grad()
        loss = fn(heads, batch, random.Random(1), 10, 0.05, torch.device("cpu"))
        loss.backward()
        grads.append((loss.detach(), [q.grad.clone() for q in heads.parameters()]))
    (got, got_grads), (want, want_grads) = grads
    assert want > 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert b.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_combination_score_is_the_mean_reward_of_its_frames():
    rewards = torch.tensor([0.0, 1.0, 2.0, 4.0])
    combos = torch.tensor([[0, 1], [2, 3], [1, 3]])
    assert combination_scores(rewards, combos).tolist() == [0.5, 3.0, 2.5]


def test_evenness_and_the_coverage_term_on_hand_computed_values():
    # M = 4 candidates at 0.5, 1.5, 2.5, 3.5 of a video of length 4; frame 1 leaves gaps 1.5 and 2.5
    assert evenness(torch.tensor([[1], [0]]), 4).tolist() == [1 - 2 * (0.375 ** 2 + 0.625 ** 2),
                                                              1 - 2 * (0.125 ** 2 + 0.875 ** 2)]
    spread, bunched = evenness(torch.tensor([[3, 6, 9, 12], [0, 1, 2, 3]]), 16).tolist()  # gaps 3.5, 3, 3, 3, 3.5
    assert spread == 1 - 5 * (2 * 3.5 ** 2 + 3 * 3 ** 2) / 16 ** 2 and bunched < -0.9
    rewards, combos = torch.tensor([0.0, 1.0, 2.0, 4.0]), torch.tensor([[0, 1], [2, 3], [1, 3]])
    want = combination_scores(rewards, combos) + 0.5 * evenness(combos, 4).float()
    assert torch.allclose(combination_scores(rewards, combos, torch.tensor(0.5)), want)


@pytest.mark.parametrize("weight", [-0.7, 0.0, 0.2, 1.0, 5.0])
def test_select_frames_finds_the_best_combination_of_reward_and_evenness(weight):
    """The dynamic programme picks what trying every combination picks; weight 0 is the plain top T."""
    import itertools

    g = torch.Generator().manual_seed(int(weight * 10) + 3)
    for m, t in [(10, 4), (9, 1), (7, 6), (12, 3)]:
        rewards = torch.rand(m, generator=g, dtype=torch.float64)
        combos = torch.tensor(list(itertools.combinations(range(m), t)))
        best = combos[combination_scores(rewards, combos, torch.tensor(weight, dtype=torch.float64)).argmax()]
        assert select_frames(rewards, t, weight) == best.tolist()
        assert select_frames(rewards, t, None) == select_top(rewards, t)
    flat = torch.zeros(16)  # nothing to choose between: a positive weight spreads the frames evenly, a negative
    assert select_frames(flat, 4, 1.0) == [3, 6, 9, 12]  # one leaves one long gap, frames at both ends
    assert select_frames(flat, 4, -1.0) in ([0, 1, 2, 15], [0, 13, 14, 15])


def test_a_coverage_scorer_learns_which_questions_want_their_frames_spread(tmp_path):
    """Labels where one kind of question is answered best by evenly spread frames and the other by bunched ones
    (its frame rewards carry no signal): training gives the first a positive coverage weight, the second a
    negative one, and the weight survives save / load."""
    import random

    from train_voyager import Item, batch_loss

    g = torch.Generator().manual_seed(0)
    m, t, hidden = 12, 4, 8
    kinds = [torch.randn(hidden, generator=g) for _ in range(2)]
    items = []
    for n in range(64):
        combos = torch.stack([torch.randperm(m, generator=g)[:t].sort().values for _ in range(24)])
        sign = 1.0 if n % 2 == 0 else -1.0  # kind 0: spread is better (lower loss); kind 1: bunched
        losses = -sign * evenness(combos, m).float() + 0.05 * torch.rand(24, generator=g)
        query = kinds[n % 2] + 0.1 * torch.randn(5, hidden, generator=g)
        items.append(Item(torch.randn(m, 2, hidden, generator=g), query, combos, losses, list(range(m)), 48, None))
    torch.manual_seed(0)
    heads = VoyagerHeads(hidden, 16, "mean", coverage=True)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    rng = random.Random(0)
    for step in range(150):
        loss = batch_loss(heads, items[(step * 16) % 64:][:16], rng, 0, 0.0, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weights = [heads(items[k].frames, items[k].query)[1].item() for k in (0, 1)]
    assert weights[0] > 0.5 and weights[1] < -0.5, weights
    spec = VoyagerSpec(backbone="b", layers=1, hidden_size=hidden, dim=16, coverage=True)
    save_voyager(tmp_path, heads, spec)
    loaded, loaded_spec = load_voyager(tmp_path)
    assert loaded_spec.coverage and loaded(items[0].frames, items[0].query)[1].item() == pytest.approx(weights[0])


def test_select_top_returns_the_best_frames_in_temporal_order():
    assert select_top([0.1, 0.9, 0.5, 0.8, 0.2], 3) == [1, 2, 3]
    assert select_top(torch.tensor([0.3, 0.1, 0.7, 0.2]), 2) == [0, 2]
    assert select_top([0.5, 0.5, 0.5], 2) == [0, 1]  # ties go to the earlier frame
    with pytest.raises(ValueError):
        select_top([0.1, 0.2], 3)


@pytest.fixture(scope="module")
def tiny(tiny_arch_dir):
    """Every family's backbone (Qwen3-VL: DeepStack features injected into the bottom layers)."""
    return load_model(tiny_arch_dir).eval(), load_processor(tiny_arch_dir)


def test_bottom_layers_and_backbone_features_equal_the_models_own_forward(tiny, tiny_world_dir):
    model, processor = tiny
    sample = load_samples(tiny_world_dir / "test.json")[0]
    clip = read_frames(sample.path, num_frames=6)
    inputs = own_patch_inputs(processor, clip, chat_text(processor, sample.problem))
    lm = model.model.language_model
    with torch.no_grad():
        want = model.model(**inputs).last_hidden_state[0]
        model.model.rope_deltas = None
        ids = inputs["input_ids"]
        video_mask = ids == model.config.video_token_id
        visual = torch.cat(encode_visual(model, inputs["pixel_values_videos"], inputs.get("video_grid_thw")))
        embeds, deepstack = embed_visual(model.get_input_embeddings()(ids), video_mask, visual)
        got = lm.norm(bottom_layers(model, embeds, position_ids(model, inputs), len(lm.layers), deepstack))[0]
        frames, query = backbone_features(model, processor, clip, sample.problem, layers=len(lm.layers))
        assert torch.allclose(got, want, atol=1e-5)
        # backbone_features at the top layer: the model's own hidden states at the frames and the query
        video_pos = video_mask[0].nonzero().squeeze(1)
        frame_pos = video_pos[: len(video_pos) - visual_layout(model).video_end_tokens]  # not LLaVA's newline
        assert torch.allclose(lm.norm(frames.flatten(0, 1)), want[frame_pos], atol=1e-5)
        end = visual_tokens(model.config).vision_end
        query_start = int(video_pos[-1]) + 1 + int(end is not None)  # after <|vision_end|> where there is one
        assert torch.allclose(lm.norm(query), want[query_start:], atol=1e-5)
        assert ids[0, query_start - 1] in (model.config.video_token_id, end)
    frames, query = backbone_features(model, processor, clip, sample.problem, layers=1)
    one_frame = own_patch_inputs(processor, subclip(clip, [0]), chat_text(processor, sample.problem))["input_ids"]
    per_frame = int((one_frame == model.config.video_token_id).sum()) - visual_layout(model).video_end_tokens
    assert frames.shape == (6, per_frame, model.config.text_config.hidden_size)  # each frame its own patch
    assert query.shape[0] > 3


def test_save_load_round_trip_and_backbone_mismatch_errors(tiny, tmp_path):
    model, _ = tiny
    torch.manual_seed(0)
    hidden = model.config.text_config.hidden_size
    heads = VoyagerHeads(hidden, 16, "max")
    spec = VoyagerSpec(backbone="tiny", layers=1, hidden_size=hidden, dim=16, token_pool="max",
                       fingerprint=backbone_fingerprint(model))
    save_voyager(tmp_path / "v", heads, spec)
    loaded, loaded_spec = load_voyager(tmp_path / "v", backbone=model)
    frames, query = torch.randn(5, 4, spec.hidden_size), torch.randn(7, spec.hidden_size)
    assert loaded_spec == spec
    assert torch.equal(loaded(frames, query)[0], heads.eval()(frames, query)[0])
    assert backbone_fingerprint(model.to(torch.bfloat16)) == spec.fingerprint  # dtype does not matter
    model.to(torch.float32)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(1e-2)
    with pytest.raises(ValueError, match="different weights"):
        load_voyager(tmp_path / "v", backbone=other)
    spec_json = json.loads((tmp_path / "v" / "voyager.json").read_text())
    spec_json["fingerprint"]["hidden_size"] = 4096
    (tmp_path / "v" / "voyager.json").write_text(json.dumps(spec_json))
    with pytest.raises(ValueError, match=f"hidden_size is {hidden}, the heads were trained on 4096"):
        load_voyager(tmp_path / "v", backbone=model)


def run(script, args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=cpu_launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def trained(request, tiny_world_dir, tmp_path_factory):
    """label -> train on a family with a pixel budget, labeled below its default 12544 (the Voyager must then
    apply it at eval), and on one that resizes every frame to a fixed size (LLaVA-OneVision: no budget)."""
    model_dir = request.getfixturevalue(TINY_ARCH_FIXTURES[request.param])
    processor = load_processor(model_dir)
    fixed = video_format(processor).fixed_frame_size
    budget = video_max_pixels(processor) if fixed else 3136
    out = tmp_path_factory.mktemp("voyager_pipeline")
    run("label_frames.py", [f"model={model_dir}", f"data={tiny_world_dir / 'train.json'}",
                            f"output_dir={out / 'labels'}", "candidates=8", "num_frames=2", "max_combinations=12",
                            *([] if fixed else [f"max_pixels={budget}"])])
    run("train_voyager.py", [f"labels={out / 'labels' / 'labels.jsonl'}", f"output_dir={out / 'voyager'}",
                             "layers=1", "dim=16", "epochs=2", "batch_size=4", "val_fraction=0.25"])
    return out, model_dir, budget


def test_training_writes_heads_spec_and_validation_metrics(trained):
    out, model_dir, budget = trained
    spec = json.loads((out / "voyager" / "voyager.json").read_text())
    assert spec["backbone"] == str(model_dir) and spec["layers"] == 1 and spec["num_frames"] == 2
    assert spec["candidates"] == 8 and spec["candidate_sizes"] == [8]
    # The scorer's features were computed at the labels' pixel budget, and its selector will apply it.
    assert spec["max_pixels"] == budget
    assert {r["max_pixels"] for r in read_jsonl(out / "labels" / "labels.jsonl")} == {budget}
    metrics = read_jsonl(out / "voyager" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for key in ("pair_accuracy", "pair_accuracy_large_gap", "spearman", "evidence_recall_voyager",
                "evidence_recall_uniform"):
        assert 0.0 <= abs(metrics[-1][key]) <= 1.0


@pytest.mark.parametrize("strategy", ["voyager", "retrieval"])
def test_eval_selects_frames_with_voyager_and_retrieval(trained, tiny_world_dir, strategy):
    out, model_dir, _ = trained
    out = out / f"eval_{strategy}"
    run("eval.py", [f"model={model_dir}", f"data={tiny_world_dir / 'test.json'}", f"output_dir={out}",
                    f"frames.strategy={strategy}", f"frames.voyager={out.parent / 'voyager'}", "frames.candidates=12",
                    "frames.num=3", "batch_size=4", "max_new_tokens=8", "limit=4"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["n_failed"] == 0 and "evidence_recall" in summary
    candidates = {s.problem_id: read_frames(s.path, num_frames=12).indices
                  for s in load_samples(tiny_world_dir / "test.json")}
    for row in read_jsonl(out / "predictions.jsonl"):
        frames = row["frame_indices"]
        assert len(frames) == 3 and frames == sorted(frames) and set(frames) <= set(candidates[row["problem_id"]])


def test_a_scorer_picks_frames_for_another_familys_model(trained, tiny_world_dir, request):
    """Plug and play: a scorer trained on one family runs its own backbone; a model of the other family (Qwen
    scorer -> LLaVA-OneVision answers, and the reverse) answers on the frames it chose, exactly those the scorer
    picks on its own, as a normal clip."""
    from common.voyager import VoyagerSelector

    out, model_dir, _ = trained
    other = "tiny_llava_onevision_dir" if model_dir == request.getfixturevalue("tiny_model_dir") else "tiny_model_dir"
    answering = request.getfixturevalue(other)
    run("eval.py", [f"model={answering}", f"data={tiny_world_dir / 'test.json'}", f"output_dir={out / 'eval_cross'}",
                    "frames.strategy=voyager", f"frames.voyager={out / 'voyager'}", "frames.candidates=12",
                    "frames.num=3", "batch_size=4", "max_new_tokens=8", "limit=4"])
    summary = json.loads((out / "eval_cross" / "summary.json").read_text())
    assert summary["n"] == 4 and summary["n_failed"] == 0
    select = VoyagerSelector(str(out / "voyager"), candidates=12, num=3)  # no answering model: its own backbone
    samples = {s.problem_id: s for s in load_samples(tiny_world_dir / "test.json")}
    rows = read_jsonl(out / "eval_cross" / "predictions.jsonl")
    assert len(rows) == 4
    for row in rows:
        assert row["frame_indices"] == select(samples[row["problem_id"]]).indices
    # a scorer whose backbone path does not resolve here says so, naming its file and key
    moved = out / "voyager_moved"
    shutil.copytree(out / "voyager", moved, dirs_exist_ok=True)
    spec = json.loads((moved / "voyager.json").read_text())
    (moved / "voyager.json").write_text(json.dumps({**spec, "backbone": "runs_elsewhere/sft/final"}))
    with pytest.raises(FileNotFoundError, match=r"moved/voyager\.json: 'backbone' 'runs_elsewhere/sft/final' is not"):
        VoyagerSelector(str(moved), candidates=12, num=3)


def test_voyager_select_runs_aks_or_a_dpp_on_the_scorers_frame_rewards(trained, tiny_world_dir):
    """frames.voyager_select: the frames are select_top / aks_select / dpp_select of the rewards the scorer gives
    (the DPP's similarity: cosine of the frames' mean backbone features), recomputed here step by step."""
    from common.config import ConfigError, load_config
    from common.frames import FramesConfig, make_selector
    from common.selectors import aks_select, dpp_select
    from common.voyager import backbone_features, read_candidates, voyager_query

    out, _, _ = trained
    cfg = dict(strategy="voyager", voyager=str(out / "voyager"), candidates=12, num=4)
    top = make_selector(FramesConfig(**cfg))
    aks = make_selector(FramesConfig(**cfg, voyager_select="aks"))
    dpp = make_selector(FramesConfig(**cfg, voyager_select="dpp"))
    for sample in load_samples(tiny_world_dir / "test.json")[:6]:
        clip = read_candidates(sample.path, 12, 4)
        query = voyager_query(sample.problem, sample.options)
        with torch.no_grad():
            frames, q = backbone_features(top.model, top.processor, clip, query, top.spec.layers)
            rewards, coverage = top.heads(frames, q)
        assert coverage is None  # trained without coverage=true
        assert torch.equal(rewards, top.frame_rewards(clip, query))
        unit = torch.nn.functional.normalize(frames.mean(1).double(), dim=-1)
        assert top(sample).indices == [clip.indices[p] for p in select_top(rewards, 4)]
        assert aks(sample).indices == [clip.indices[p] for p in aks_select(rewards, 4)]
        assert dpp(sample).indices == [clip.indices[p] for p in dpp_select(rewards, unit @ unit.T, 4)]
    with pytest.raises(ConfigError, match="voyager_select: 'best' is not one of 'top', 'aks', 'dpp'"):
        load_config(FramesConfig, None, ["voyager_select=best"])
    # frames.aks_threshold reaches the selection: 0 is plain top-T
    zero = make_selector(FramesConfig(**cfg, voyager_select="aks", aks_threshold=0.0))
    sample = load_samples(tiny_world_dir / "test.json")[0]
    assert zero(sample).indices == top(sample).indices
    with pytest.raises(ConfigError, match=r"frames.aks_threshold: must be in \[0, 1\]"):
        FramesConfig(aks_threshold=1.5).validate()


def test_two_processes_shard_the_features_and_validate_as_one(trained, tmp_path):
    """accelerate launch with 2 CPU processes: each extracts and trains on its shard (the batched step through the
    DDP-wrapped heads, with a coverage head), and validation summed over the shards gives the untrained heads the
    same metrics as one process does."""
    out, _, _ = trained
    args = [f"labels={out / 'labels' / 'labels.jsonl'}", "dim=16", "epochs=1", "batch_size=2", "val_fraction=0.25",
            "coverage=true"]
    proc = subprocess.run(launch_command("train_voyager.py", [*args, f"output_dir={tmp_path / 'two'}"], num_processes=2,
                                         main_process_port=29647), cwd=ROOT, env=cpu_launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    run("train_voyager.py", [*args, f"output_dir={tmp_path / 'one'}"])
    two, one = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("two", "one"))
    assert [m["epoch"] for m in two] == [0, 1]
    for key in ("pair_accuracy", "pair_accuracy_large_gap", "spearman", "evidence_recall_uniform"):
        assert two[0][key] == pytest.approx(one[0][key], abs=1e-6), key
    assert json.loads((tmp_path / "two" / "voyager.json").read_text())["coverage"] is True


def test_training_stops_with_a_clear_error_when_no_video_can_be_read(trained, tmp_path):
    out, _, _ = trained
    rows = read_jsonl(out / "labels" / "labels.jsonl")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({**r, "path": str(tmp_path / f"gone_{r['problem_id']}.mp4")}) + "\n"
                              for r in rows))
    proc = subprocess.run([sys.executable, "train_voyager.py", f"labels={labels}", f"output_dir={tmp_path / 'v'}",
                           "dim=16", "epochs=1", "val_fraction=0.25"], cwd=ROOT, env=cpu_launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{labels}: none of the" in proc.stderr and "gone_" in proc.stderr and "missing file" in proc.stderr


def test_a_coverage_scorer_picks_by_reward_and_evenness_in_eval(trained, tiny_world_dir, tmp_path):
    """eval's Voyager selector with a coverage head (voyager.json: coverage true) picks select_frames of the rewards
    and the weight it gives the question; a large weight spreads the frames where the top T would not."""
    from common.frames import FramesConfig, make_selector
    from common.voyager import backbone_features, read_candidates, voyager_query

    out, _, _ = trained
    heads, spec = load_voyager(out / "voyager")
    covered = VoyagerHeads(spec.hidden_size, spec.dim, spec.token_pool, coverage=True)
    covered.load_state_dict({**heads.state_dict(), "coverage_head.weight": torch.zeros(1, spec.dim),
                             "coverage_head.bias": torch.tensor([50.0])})  # the same rewards, weight 50
    spec.coverage = True
    save_voyager(tmp_path / "covered", covered, spec)
    selector = make_selector(FramesConfig(strategy="voyager", voyager=str(tmp_path / "covered"), candidates=12, num=4))
    scaled = {s: make_selector(FramesConfig(strategy="voyager", voyager=str(tmp_path / "covered"), candidates=12,
                                            num=4, coverage_scale=s)) for s in (0.0, 0.02)}
    differs = 0
    for sample in load_samples(tiny_world_dir / "test.json")[:6]:
        clip = read_candidates(sample.path, 12, 4)
        with torch.no_grad():
            frames, q = backbone_features(selector.model, selector.processor, clip,
                                          voyager_query(sample.problem, sample.options), spec.layers)
            rewards, weight = covered(frames, q)
        assert weight.item() == 50.0
        picked = [clip.indices.index(i) for i in selector(sample).indices]
        assert picked == select_frames(rewards, 4, weight)
        differs += picked != select_top(rewards, 4)
        # frames.coverage_scale multiplies the head's weight: 0 is the top T of the same rewards
        assert [clip.indices.index(i) for i in scaled[0.0](sample).indices] == select_top(rewards, 4)
        assert [clip.indices.index(i) for i in scaled[0.02](sample).indices] == select_frames(rewards, 4, 1.0)
    assert differs > 0
    with pytest.raises(ValueError, match="frames.coverage_scale"):
        FramesConfig(coverage_scale=-1.0).validate()


def test_retrieval_with_a_clip_model_keeps_the_most_similar_frames(tiny_world_dir, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from common.voyager import RetrievalSelector

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")

    select = RetrievalSelector(candidates=8, num=3, retrieval_model=str(tmp_path / "clip"))
    sample = load_samples(tiny_world_dir / "test.json")[0]
    clip = read_frames(sample.path, num_frames=8)
    scores = select.frame_scores(clip, sample.problem + "\n" + "\n".join(sample.options))
    assert scores.shape == (8,)
    chosen = select(sample)
    assert chosen.indices == [clip.indices[p] for p in select_top(scores, 3)]
