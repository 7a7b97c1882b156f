"""The cheap attribution passes give the same log-probs as the straightforward computation
(vision re-encoded per condition, full float32 logits), and a training step with every signal
off is plain GRPO."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from common.attribution import (
    build_rollout,
    counterfactual_logps,
    naive_logps,
    permute_temporal_patches,
    policy_logps,
    prefix_shared_logps,
    shuffle_frames,
    temporal_permutation,
    visual_features,
)
from common.grpo import grpo_loss, key_token_mask
from common.models import load_model, load_processor, model_inputs, video_format, visual_layout, visual_tokens
from common.video import read_frames

G = 3


@pytest.fixture(scope="module")
def setup(tiny_attribution_arch_dir, tiny_world_dir):
    """Every test here runs once per supported family (Qwen3-VL: timestamps as text, DeepStack; LLaVA-OneVision:
    no grids, 1-D positions, a newline after each video, video prompts only)."""
    torch.manual_seed(0)
    model = load_model(tiny_attribution_arch_dir).eval()
    processor = load_processor(tiny_attribution_arch_dir)
    records = json.loads((tiny_world_dir / "train.json").read_text())
    # A fixed-frame-size processor stacks a batch's videos into one (videos, frames, C, H, W) tensor: equal lengths.
    lengths = (8, 8) if video_format(processor).fixed_frame_size else (8, 6)
    clips = [read_frames(tiny_world_dir / r["path"], num_frames=n) for r, n in zip(records[:2], lengths, strict=True)]
    image = np.asarray(read_frames(tiny_world_dir / records[2]["path"], indices=[5]).frames[0])
    return model, processor, records, clips, image


def make_rollout(model, processor, prompts, visuals):
    inputs = model_inputs(processor, prompts, visuals)
    ids = visual_tokens(model.config)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, max_new_tokens=12, num_return_sequences=G,
                             bad_words_ids=[[t] for t in ids.placeholders])
    model.model.rope_deltas = None
    completions = out[:, inputs["input_ids"].shape[1]:]
    return build_rollout(model, inputs, completions, G, [processor.tokenizer.eos_token_id])


def max_diff(a, b, mask):
    return (a - b).abs()[mask].max().item()


def test_real_and_counterfactual_logps_equal_the_straightforward_passes(setup):
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["Short question?", records[1]["problem"] + " Long one."], clips)
    valid = rollout.completion_mask
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        real, _ = policy_logps(model, rollout, features, chunk_size=5)
        masked = counterfactual_logps(model, rollout, None, drop_visual=True, chunk_size=5)
        gen = torch.Generator().manual_seed(0)
        perms = [temporal_permutation(t, "shuffle", gen) for t in features.video_patches]
        shuffled = counterfactual_logps(model, rollout, permute_temporal_patches(features, perms), drop_visual=False,
                                        chunk_size=5)
    assert max_diff(real, naive_logps(model, rollout, "real"), valid) <= 1e-4
    assert max_diff(masked, naive_logps(model, rollout, "masked"), valid) <= 1e-4
    assert max_diff(shuffled, naive_logps(model, rollout, "shuffled", perms), valid) <= 1e-4
    # The counterfactuals really change the input: the scores are not all zero.
    assert max_diff(real, masked, valid) > 1e-3 and max_diff(real, shuffled, valid) > 1e-3


def test_frame_shuffle_pass_equals_the_model_on_the_shuffled_frames(setup):
    """frame_shuffle re-encodes single frames in a new order (pairs change): its cheap pass equals a plain
    forward on those pixels, timestamp tokens (Qwen3-VL) staying where they are. Where the tower encodes every
    frame alone (LLaVA-OneVision), permuting the cached features the same way gives the same log-probs."""
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["A video?", records[1]["problem"]], clips)
    per_patch = visual_layout(model).frames_per_patch
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        perms = [temporal_permutation(t * per_patch, "frame_shuffle", gen) for t in features.video_patches]
        shuffled = dataclasses.replace(rollout, visual_inputs=shuffle_frames(model, rollout.visual_inputs, perms))
        ours = counterfactual_logps(model, rollout, visual_features(model, shuffled.visual_inputs), drop_visual=False)
        real = counterfactual_logps(model, rollout, features, drop_visual=False)
        if per_patch == 1:  # what train_ktr.py computes for frame_shuffle there: no re-encoding
            cached = counterfactual_logps(model, rollout, permute_temporal_patches(features, perms), drop_visual=False)
    valid = rollout.completion_mask
    assert max_diff(ours, naive_logps(model, shuffled, "real"), valid) <= 1e-4
    assert max_diff(ours, real, valid) > 1e-3
    if per_patch == 1:
        assert max_diff(cached, ours, valid) <= 1e-4


def test_mixed_video_and_image_batch_matches_straightforward(setup):
    model, processor, records, clips, image = setup
    if not visual_layout(model).image_grids:  # images tiled "anyres" apart from videos: refused, by property
        with pytest.raises(ValueError, match=r"visual_layout\(model\).image_grids is False"):
            make_rollout(model, processor, ["A video?", "An image?"], [clips[0], image])
        return
    rollout = make_rollout(model, processor, ["A video?", "An image?"], [clips[0], image])
    assert rollout.kinds == ["video", "image"]
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        real, _ = policy_logps(model, rollout, features, chunk_size=4)
        masked = counterfactual_logps(model, rollout, None, drop_visual=True, chunk_size=4)
    valid = rollout.completion_mask
    assert max_diff(real, naive_logps(model, rollout, "real"), valid) <= 1e-4
    assert max_diff(masked, naive_logps(model, rollout, "masked"), valid) <= 1e-4


@pytest.mark.parametrize("mode", ["shuffle", "reverse", "segment_shuffle"])
def test_temporal_permutations_are_permutations_that_move_something(mode):
    gen = torch.Generator().manual_seed(1)
    for n in (2, 3, 8):
        perm = temporal_permutation(n, mode, gen, segments=2)
        assert sorted(perm.tolist()) == list(range(n))
        assert not torch.equal(perm, torch.arange(n)), (mode, n)
    assert temporal_permutation(4, "reverse", gen).tolist() == [3, 2, 1, 0]


def test_step_with_all_signals_off_is_plain_grpo(setup):
    """Gradients of our loss (shared features, chunked log-probs, key_token_mask=None) equal those
    of GRPO written the straightforward way from full logits."""
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["q1", "q2"], clips)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.3, -0.6])
    mask = rollout.completion_mask

    model.zero_grad()
    logps, _ = policy_logps(model, rollout, visual_features(model, rollout.visual_inputs), chunk_size=4,
                            with_entropy=False)
    loss, _ = grpo_loss(logps, None, None, advantages, mask, None, beta=0.0)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=rollout.position_ids, **rollout.repeated_visual_inputs()).logits
    model.model.rope_deltas = None
    p = rollout.prompt_length
    ref_logps = torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    ratio = torch.exp(ref_logps - ref_logps.detach())
    per_token = -ratio * advantages[:, None]
    plain = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    plain.backward()
    assert torch.allclose(loss, plain, atol=1e-6)
    for name, grad in ours.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name



@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_prefix_shared_pass_gives_the_full_forward_logps_entropies_and_gradients(setup, checkpointing):
    """prefix_sharing (train_ktr.py): each prompt runs once and its KV cache is repeated for the G completions,
    with gradients flowing back through the repeat. Same log-probs, entropies and parameter gradients as one
    forward over all B*G full rows, the vision tower's included (the tower trains here); also with gradient
    checkpointing, whose backward replays each layer, cache calls included."""
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["Short question?", records[1]["problem"] + " Long one."], clips)
    mask = rollout.completion_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # layers checkpoint only in training mode (the tiny models have no dropout)
    replays = []
    try:
        results = []
        for shared in (False, True):
            model.zero_grad()
            features = visual_features(model, rollout.visual_inputs)
            if shared:
                logps, entropy = prefix_shared_logps(model, rollout, features, chunk_size=5, with_entropy=True)
            else:
                logps, entropy = policy_logps(model, rollout, features, chunk_size=5, with_entropy=True)
            attention = model.model.language_model.layers[0].self_attn  # the layer itself replays unhooked
            hook = attention.register_forward_pre_hook(lambda *_: replays.append(torch.is_grad_enabled()))
            (logps * weights * mask).sum().backward()
            hook.remove()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logps.detach(), entropy, grads))
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    assert len(replays) == (3 if checkpointing else 0)  # the backward re-ran the layer: 1 full pass, 2 shared
    (full, full_entropy, full_grads), (shared, shared_entropy, shared_grads) = results
    model.zero_grad()
    assert max_diff(full, shared, mask) <= 1e-4 and max_diff(full_entropy, shared_entropy, mask) <= 1e-4
    assert full_grads.keys() == shared_grads.keys()
    assert any(n.startswith(("model.visual", "model.vision_tower")) for n in full_grads)  # the tower's too
    for name, grad in full_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=1e-5, rtol=1e-4), name
    assert sum(g.abs().sum() for g in full_grads.values()) > 0


def test_prefix_shared_pass_refuses_reentrant_checkpointing(setup):
    """Reentrant checkpointing runs each layer without autograd, so the prompts' keys would reach the
    completions without a gradient path: the prompt's share of the gradient would be lost silently."""
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["Short question?", records[1]["problem"] + " Long one."], clips)
    model.activation_checkpointing_enable({"use_reentrant": True})
    model.train()
    try:
        features = visual_features(model, rollout.visual_inputs)  # the tower trains here: inputs carry gradients
        with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
            prefix_shared_logps(model, rollout, features, chunk_size=5)
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def test_prefix_sharing_check_passes_rounding_and_stops_on_a_real_difference(setup):
    """train_ktr.py's first-step check of prefix_sharing: the shared pass's own log-probs pass; log-probs off by
    a tenth per token (what a kernel that misread the prompts' padding gives; measured on a broken cache:
    up to 0.97) stop the run, naming the key to turn off."""
    from types import SimpleNamespace

    from train_ktr import check_prefix_sharing

    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["Short question?", records[1]["problem"] + " Long one."], clips)
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), print=lambda *a: None)
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        shared, _ = prefix_shared_logps(model, rollout, features, chunk_size=5)
    assert check_prefix_sharing(accelerator, model, rollout, features, shared, 5) < 1e-5
    off = shared + 0.1 * rollout.completion_mask
    with pytest.raises(RuntimeError, match=r"differ from the full forward's by 0\.1000 .*set prefix_sharing=false"):
        check_prefix_sharing(accelerator, model, rollout, features, off, 5)


def test_frame_shuffle_pixels_equal_the_processor_on_shuffled_frames(setup):
    """shuffle_frames reorders single frames in the processor's pixel layout (Qwen-VL's flat patch rows, LLaVA's
    frames axis) exactly as running the processor on the shuffled frames does (no re-decoding needed)."""
    model, processor, _, clips, _ = setup
    clip = clips[0]
    perm = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    original = model_inputs(processor, ["q"], [clip])
    shuffled_clip = dataclasses.replace(clip, frames=clip.frames[perm.numpy()])
    expected = model_inputs(processor, ["q"], [shuffled_clip])["pixel_values_videos"]
    ours = shuffle_frames(model, dict(original), [perm])["pixel_values_videos"]
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, original["pixel_values_videos"])


def test_temperature_logps_are_those_of_the_sampling_distribution(setup):
    model, processor, records, clips, _ = setup
    rollout = make_rollout(model, processor, ["q1", "q2"], clips)
    rollout = dataclasses.replace(rollout, temperature=0.7)
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        ours, _ = policy_logps(model, rollout, features, chunk_size=4)
        shared = counterfactual_logps(model, rollout, features, drop_visual=False, chunk_size=4)
        at_one, _ = policy_logps(model, dataclasses.replace(rollout, temperature=1.0), features, chunk_size=4)
    valid = rollout.completion_mask
    assert max_diff(ours, naive_logps(model, rollout, "real"), valid) <= 1e-4
    assert max_diff(shared, ours, valid) <= 1e-4
    assert max_diff(ours, at_one, valid) > 1e-3


def test_image_only_batch_has_no_temporal_signal_and_does_not_crash(setup):
    """An image-only batch (Video-R1 mixes them in): the temporal pass runs (as on every rank) and
    every score is NaN, so the temporal signal selects nothing there."""
    import train_ktr

    model, processor, _, _, image = setup
    if not visual_layout(model).image_grids:
        with pytest.raises(ValueError, match=r"visual_layout\(model\).image_grids is False"):
            make_rollout(model, processor, ["An image?", "Another?"], [image, image[:40, :50]])
        return
    rollout = make_rollout(model, processor, ["An image?", "Another?"], [image, image[:40, :50]])
    assert rollout.kinds == ["image", "image"]
    cfg = train_ktr.Config()
    with torch.no_grad():
        features = visual_features(model, rollout.visual_inputs)
        assert permute_temporal_patches(features, []) is features
        real = counterfactual_logps(model, rollout, features, drop_visual=False)
        scores = train_ktr.temporal_scores(model, rollout, features, real, cfg, step=0)
        cfg.attribution.temporal_mode = "frame_shuffle"
        frame_scores = train_ktr.temporal_scores(model, rollout, features, real, cfg, step=0)
    assert scores.isnan().all() and frame_scores.isnan().all()
    mask, masks = key_token_mask({"temporal": scores}, {"temporal": 0.2}, rollout.completion_mask, G)
    assert not mask.any()


@pytest.mark.parametrize("mode", ["shuffle", "frame_shuffle"])
def test_unperturbed_input_scores_exactly_zero_in_bf16(setup, mode):
    """Under bfloat16 autocast the real log-probs of a score come from the same computation as the
    counterfactual, so an identity "perturbation" scores exactly 0 (not bf16 noise)."""
    model, processor, _, clips, image = setup
    second = image if visual_layout(model).image_grids else clips[1]  # images only where the passes take them
    rollout = make_rollout(model, processor, ["A video?", "An image?"], [clips[0], second])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = visual_features(model, rollout.visual_inputs)
        real = counterfactual_logps(model, rollout, features, drop_visual=False)
        if mode == "shuffle":
            same = permute_temporal_patches(features, [torch.arange(t) for t in features.video_patches])
        else:
            per_patch = visual_layout(model).frames_per_patch
            same = visual_features(model, shuffle_frames(model, rollout.visual_inputs,
                                                         [torch.arange(t * per_patch) for t in features.video_patches]))
        again = counterfactual_logps(model, rollout, same, drop_visual=False)
        masked = counterfactual_logps(model, rollout, None, drop_visual=True)
    valid = rollout.completion_mask
    assert real.dtype == torch.float32 and (real - again)[valid].abs().max().item() == 0.0
    assert (real - masked)[valid].abs().max().item() > 1e-3
