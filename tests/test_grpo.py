"""Tests for common.grpo; expected values are computed by hand unless compared with a naive reference."""

import functools
import math

import pytest
import torch

from common.grpo import (
    counterfactual_scores,
    entropy_from_logits,
    gradient_share,
    group_advantages,
    grpo_loss,
    key_token_mask,
    select_by_ratio,
    token_logps_and_entropy,
)

# --------------------------------------------------------------------------- group_advantages


def test_advantages_hand_example_uses_unbiased_std_and_zeros_equal_groups():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # unbiased std of [1, 0, 0, 1] = sqrt(4 * 0.25 / 3)
    assert torch.allclose(adv[:4], torch.tensor([a, -a, -a, a]))
    assert torch.equal(adv[4:], torch.zeros(4))


def test_advantages_of_identical_non_representable_rewards_are_exact_zeros():
    assert torch.equal(group_advantages(torch.full((3,), 0.1), group_size=3), torch.zeros(3))


def test_advantages_group_size_one_is_zero_not_nan():
    adv = group_advantages(torch.tensor([0.3, 1.0, -2.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_advantages_without_scale_only_centre():
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 5.0]), group_size=2, scale=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -1.0, 1.0]))


def test_advantages_reject_rewards_not_divisible_by_group():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


# --------------------------------------------------------------------------- select_by_ratio


def test_select_sequence_scope_keeps_scores_above_interpolated_quantile():
    # 1..10, ratio 0.2 -> quantile 0.8 at position 7.2 -> 8.2 -> {9, 10}; second row reversed.
    scores = torch.stack([torch.arange(1.0, 11.0), torch.arange(10.0, 0.0, -1.0)])
    mask = select_by_ratio(scores, torch.ones(2, 10, dtype=torch.bool), 0.2, scope="sequence")
    assert mask[0].nonzero().flatten().tolist() == [8, 9]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]


def test_select_group_scope_groups_are_independent_while_batch_scope_mixes_them():
    # Two groups of G=2 rows x L=5; group 1 scores are all larger than group 0's.
    scores = torch.cat([torch.arange(1.0, 11.0), torch.arange(101.0, 111.0)]).view(4, 5)
    valid = torch.ones(4, 5, dtype=torch.bool)
    group = select_by_ratio(scores, valid, 0.2, group_size=2, scope="group")
    assert scores[group].tolist() == [9.0, 10.0, 109.0, 110.0]
    # Batch: 20 values, position 0.8 * 19 = 15.2 -> 106.2 -> {107..110}, all from group 1.
    batch = select_by_ratio(scores, valid, 0.2, scope="batch")
    assert scores[batch].tolist() == [107.0, 108.0, 109.0, 110.0]


def test_select_matches_torch_quantile_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 17, generator=gen)
    valid = torch.rand(3, 17, generator=gen) > 0.3
    mask = select_by_ratio(scores, valid, 0.35, scope="sequence")
    for row in range(3):
        threshold = torch.quantile(scores[row][valid[row]], 0.65)
        assert torch.equal(mask[row], valid[row] & (scores[row] >= threshold))


def test_select_never_picks_padding_even_with_huge_scores():
    scores = torch.tensor([[1.0, 2.0, 3.0, 1e9, 1e9]])
    valid = torch.tensor([[True, True, True, False, False]])
    mask = select_by_ratio(scores, valid, 0.3, scope="sequence")
    assert mask.tolist() == [[False, False, True, False, False]]


def test_select_ignores_non_finite_scores_in_selection_and_quantile():
    scores = torch.cat([torch.arange(1.0, 11.0), torch.tensor([float("inf"), float("nan"), -float("inf")])])[None]
    mask = select_by_ratio(scores, torch.ones_like(scores, dtype=torch.bool), 0.2, scope="sequence")
    assert mask[0].nonzero().flatten().tolist() == [8, 9]


def test_select_ratio_zero_selects_nothing_and_one_selects_all_valid_finite():
    scores = torch.tensor([[3.0, float("nan"), 1.0, 2.0]])
    valid = torch.tensor([[True, True, True, False]])
    assert not select_by_ratio(scores, valid, 0.0, scope="sequence").any()
    assert select_by_ratio(scores, valid, 1.0, scope="sequence").tolist() == [[True, False, True, False]]


def test_select_keeps_all_ties_at_threshold():
    # Position 0.8 * 4 = 3.2 between two 3s -> threshold 3 -> all three 3s kept (more than ratio * n).
    mask = select_by_ratio(
        torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0]]), torch.ones(1, 5, dtype=torch.bool), 0.2, scope="sequence"
    )
    assert mask.tolist() == [[False, True, False, True, True]]


def test_select_scope_without_valid_tokens_selects_nothing():
    mask = select_by_ratio(torch.ones(2, 3), torch.tensor([[False] * 3, [True] * 3]), 0.5, group_size=1)
    assert mask.tolist() == [[False] * 3, [True] * 3]


@pytest.mark.parametrize(
    ("ratio", "group_size", "scope"),
    [(-0.1, 2, "group"), (1.5, 2, "group"), (0.2, None, "group"), (0.2, 3, "group"), (0.2, 2, "token")],
)
def test_select_rejects_bad_arguments(ratio, group_size, scope):
    with pytest.raises(ValueError):
        select_by_ratio(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), ratio, group_size, scope)


# --------------------------------------------------------------------------- scores and entropy


def test_counterfactual_scores_signed_and_absolute():
    real, perturbed = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    assert counterfactual_scores(real, perturbed).tolist() == [1.0, -2.0]
    assert counterfactual_scores(real, perturbed, mode="absolute").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        counterfactual_scores(real, perturbed, mode="ratio")


def test_entropy_uniform_is_log_vocab_and_peaked_is_near_zero():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 7)), torch.full((2,), math.log(7)))
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert entropy_from_logits(peaked).dtype == torch.float32
    assert entropy_from_logits(peaked).item() < 1e-15
    assert entropy_from_logits(torch.tensor([0.0, 0.0, -float("inf")])).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- token_logps_and_entropy


def _naive_logps_and_entropy(hidden, weight, bias, targets):
    logp = torch.nn.functional.linear(hidden, weight, bias).float().log_softmax(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def head(weight, bias):
    """An output layer to call, as the model's lm_head module is called."""
    return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)


def _lm_inputs(seed: int = 0, n: int = 2, length: int = 7, hidden_size: int = 8, vocab: int = 11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(vocab, (n, length), generator=gen)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_logps_and_entropy_equal_full_logits(chunk_size):
    hidden, weight, bias, targets = _lm_inputs()
    logps, entropy = token_logps_and_entropy(hidden, head(weight, bias), targets, chunk_size)
    ref_logps, ref_entropy = _naive_logps_and_entropy(hidden, weight, bias, targets)
    assert logps.dtype == entropy.dtype == torch.float32
    assert (logps - ref_logps).abs().max() <= 1e-5
    assert (entropy - ref_entropy).abs().max() <= 1e-5
    _, no_entropy = token_logps_and_entropy(hidden, head(weight, None), targets, chunk_size, with_entropy=False)
    assert no_entropy is None


@pytest.mark.parametrize("chunk_size", [2, 7])
def test_chunked_checkpointed_gradients_equal_full_logits_gradients(chunk_size):
    hidden, weight, bias, targets = _lm_inputs(seed=1)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for chunked in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if chunked:
            logps, entropy = token_logps_and_entropy(h, head(w, b), targets, chunk_size)
            assert not entropy.requires_grad
        else:
            logps, _ = _naive_logps_and_entropy(h, w, b, targets)
        (logps * upstream).sum().backward()
        grads.append((h.grad, w.grad, b.grad))
    for chunked_grad, full_grad in zip(*grads, strict=True):
        assert torch.allclose(chunked_grad, full_grad, atol=1e-6)


def test_chunked_policy_pass_saves_no_logits_tensor_for_backward():
    """Memory probe: under checkpointing the graph keeps only each chunk's inputs, never (N, chunk, V) logits."""
    vocab = 50
    hidden, weight, _, targets = _lm_inputs(length=12, vocab=vocab)
    hidden.requires_grad_()
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logps_and_entropy(hidden, head(weight, None), targets, chunk_size=4)
        assert saved_shapes and not any(len(shape) == 3 and shape[-1] == vocab for shape in saved_shapes)
        saved_shapes.clear()
        _naive_logps_and_entropy(hidden, weight, None, targets)
        assert (2, 12, vocab) in saved_shapes  # the probe does see full logits when they are kept


# --------------------------------------------------------------------------- key_token_mask


def test_key_token_mask_is_union_of_per_signal_selections():
    gen = torch.Generator().manual_seed(3)
    scores = {"visual": torch.randn(4, 6, generator=gen), "entropy": torch.rand(4, 6, generator=gen)}
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 4:] = False
    union, masks = key_token_mask(scores, {"visual": 0.2, "entropy": 0.3}, valid, group_size=2)
    assert torch.equal(masks["visual"], select_by_ratio(scores["visual"], valid, 0.2, 2))
    assert torch.equal(masks["entropy"], select_by_ratio(scores["entropy"], valid, 0.3, 2))
    assert torch.equal(union, masks["visual"] | masks["entropy"])
    assert not union[1, 4:].any()


def test_key_token_mask_zero_ratio_or_absent_signal_contributes_nothing():
    scores = {"visual": torch.arange(12.0).view(2, 6), "entropy": -torch.arange(12.0).view(2, 6)}
    valid = torch.ones(2, 6, dtype=torch.bool)
    union, masks = key_token_mask(scores, {"visual": 0.2, "entropy": 0.0, "temporal": 0.5}, valid, group_size=2)
    assert set(masks) == {"visual"}
    assert torch.equal(union, select_by_ratio(scores["visual"], valid, 0.2, 2))


def test_gradient_share_is_the_masks_share_of_the_sampled_logits_gradient():
    """The share equals what autograd sends to each sampled token's own logit under the plain policy term
    sum A * log p(y): |A| (1 - p(y)) summed over the mask, over the same sum for every completion token."""
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 6, 7, generator=gen)).requires_grad_()
    targets = torch.randint(0, 7, (4, 6), generator=gen)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[2, 3:] = False  # padding: no share, whatever its mask says
    advantages = torch.tensor([1.5, -0.5, 0.0, -2.0])
    mask = torch.rand(4, 6, generator=gen) < 0.4
    mask[2, 5] = True
    logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (advantages.unsqueeze(1) * torch.where(valid, logps, 0.0)).sum().backward()
    own = logits.grad.gather(-1, targets.unsqueeze(-1)).squeeze(-1).abs()  # gradient at each sampled logit
    expected = own[mask & valid].sum() / own[valid].sum()
    shares = gradient_share(logps, advantages, valid, {"mask": mask, "all": torch.ones_like(mask)})
    assert shares["mask"] == pytest.approx(expected.item(), rel=1e-5)
    assert shares["all"] == pytest.approx(1.0)
    assert 0.0 < shares["mask"] < 1.0
    # a token the policy is sure of carries almost nothing: half the tokens certain, their share near 0
    sure = torch.tensor([[-1e-6, -1.0], [-1e-6, -2.0]])  # log p(y): p = 1 - 1e-6 vs p = 0.37, 0.14
    shares = gradient_share(sure, torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool),
                            {"sure": torch.tensor([[True, False], [True, False]])})
    assert shares["sure"] < 1e-5
    # no advantage anywhere: no gradient to share
    assert gradient_share(logps, torch.zeros(4), valid, {"mask": mask}) == {"mask": 0.0}


def test_key_token_mask_without_active_signal_means_plain_grpo():
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert key_token_mask({}, {"visual": 0.2}, valid, group_size=2) == (None, {})
    assert key_token_mask({"visual": torch.zeros(2, 3)}, {"visual": 0.0}, valid, group_size=2) == (None, {})


# --------------------------------------------------------------------------- grpo_loss

# 2 x 3 example, ratio 1 (old_logps None): per-token policy loss = -A = [[-1]*3, [2]*3].
# Completion mask drops (0, 2); key mask drops (0, 1) and (1, 2) -> policy mask [[1, 0, 0], [1, 1, 0]].
# KL per token k = [[a, 0, c], [0, a, a]] with a = k3(ln 2) = 1 - ln 2 (c is outside the completion).
A_K3 = 1 - math.log(2)
ADVANTAGES = torch.tensor([1.0, -2.0])
COMPLETION = torch.tensor([[1, 1, 0], [1, 1, 1]])
KEY = torch.tensor([[True, False, True], [True, True, False]])
REF = torch.tensor([[math.log(2), 0.0, 5.0], [0.0, math.log(2), math.log(2)]])


@pytest.mark.parametrize(
    ("aggregation", "policy", "kl"),
    [
        ("sequence_mean", (-1 / 1 + 4 / 2) / 2, (A_K3 / 1 + A_K3 / 2) / 2),
        ("token_mean", (-1 + 2 + 2) / 3, 2 * A_K3 / 3),
        ("constant", (-1 + 2 + 2) / (2 * 4), 2 * A_K3 / (2 * 4)),
    ],
)
def test_grpo_loss_hand_values_per_aggregation(aggregation, policy, kl):
    loss, metrics = grpo_loss(
        torch.zeros(2, 3),
        None,
        REF,
        ADVANTAGES,
        COMPLETION,
        KEY,
        beta=0.04,
        aggregation=aggregation,
        max_completion_length=4,
    )
    assert loss.item() == pytest.approx(policy + 0.04 * kl)
    assert metrics["policy_loss"] == pytest.approx(policy)
    assert metrics["kl_loss"] == pytest.approx(kl)
    assert metrics["kl"] == pytest.approx(3 * A_K3 / 5)  # over all 5 completion tokens
    assert metrics["selected_fraction"] == pytest.approx(3 / 5)
    assert metrics["clip_fraction"] == 0.0


def test_grpo_loss_kl_follows_key_mask_by_default_and_all_completion_tokens_on_request():
    logps = torch.zeros(2, 3, requires_grad=True)
    _, default = grpo_loss(logps, None, REF, ADVANTAGES, COMPLETION, KEY)
    loss, everywhere = grpo_loss(logps, None, REF, ADVANTAGES, COMPLETION, KEY, kl_on_all_tokens=True)
    assert default["kl_loss"] == pytest.approx((A_K3 + A_K3 / 2) / 2)
    assert everywhere["kl_loss"] == pytest.approx((A_K3 / 2 + 2 * A_K3 / 3) / 2)
    loss.backward()
    # Non-key completion tokens get only the KL gradient: d/dlogp k3 = 1 - exp(ref - logp).
    assert logps.grad[0, 1].item() == 0.0  # ref == logp there, so its KL gradient is zero too
    assert logps.grad[1, 2].item() == pytest.approx(0.04 * (1 - 2) / 3 / 2)
    assert logps.grad[0, 2].item() == 0.0  # outside the completion


def test_grpo_loss_clipping_zeroes_gradient_on_the_clipped_side_only():
    # ratios [1.5, 1.1, 0.5] per row; row 0 has A = +1, row 1 has A = -1.
    ratios = torch.tensor([[1.5, 1.1, 0.5], [1.5, 1.1, 0.5]])
    old = -ratios.log()
    adv = torch.tensor([1.0, -1.0])
    complete = torch.ones(2, 3)

    def grads(epsilon_high):
        logps = torch.zeros(2, 3, requires_grad=True)
        loss, metrics = grpo_loss(logps, old, None, adv, complete, beta=0.0, epsilon=0.2, epsilon_high=epsilon_high)
        loss.backward()
        return logps.grad, metrics

    grad, metrics = grads(None)
    # A > 0 clips above 1.2 (1.5); A < 0 clips below 0.8 (0.5); the other sides stay unclipped.
    assert (grad != 0).tolist() == [[False, True, True], [True, True, False]]
    assert grad[0, 1].item() == pytest.approx(-1.1 * 1.0 / 3 / 2)
    assert grad[1, 0].item() == pytest.approx(1.5 * 1.0 / 3 / 2)
    assert metrics["clip_fraction"] == pytest.approx(2 / 6)
    grad, metrics = grads(0.6)  # upper bound 1.6 releases the 1.5 token
    assert (grad != 0).tolist() == [[True, True, True], [True, True, False]]
    assert metrics["clip_fraction"] == pytest.approx(1 / 6)


def test_grpo_loss_without_key_mask_equals_all_true_key_mask_values_and_gradients():
    gen = torch.Generator().manual_seed(4)
    base, old, ref = (torch.randn(4, 5, generator=gen) * 0.1 for _ in range(3))
    adv, complete = torch.randn(4, generator=gen), torch.rand(4, 5, generator=gen) > 0.2
    results = []
    for key in (None, torch.ones(4, 5, dtype=torch.bool)):
        logps = base.clone().requires_grad_()
        loss, metrics = grpo_loss(logps, old, ref, adv, complete, key)
        loss.backward()
        results.append((loss, logps.grad, metrics))
    (loss_none, grad_none, metrics_none), (loss_all, grad_all, metrics_all) = results
    assert torch.equal(loss_none, loss_all)
    assert torch.equal(grad_none, grad_all)
    assert metrics_none == metrics_all


def test_grpo_loss_tokens_outside_key_mask_get_zero_gradient():
    gen = torch.Generator().manual_seed(5)
    logps = (torch.randn(2, 4, generator=gen) * 0.1).requires_grad_()
    key = torch.tensor([[True, False, True, False], [False, False, True, True]])
    loss, _ = grpo_loss(logps, None, torch.randn(2, 4, generator=gen), torch.tensor([1.0, -1.0]), torch.ones(2, 4), key)
    loss.backward()
    assert torch.equal(logps.grad[~key], torch.zeros(4))
    assert (logps.grad[key] != 0).all()


def test_grpo_loss_rejects_inconsistent_arguments():
    args = (torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(*args, None, ADVANTAGES, COMPLETION, beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*args, REF, ADVANTAGES, COMPLETION, aggregation="constant")
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(*args, REF, ADVANTAGES, COMPLETION, aggregation="sum")


def test_grpo_loss_kl_clamp_bounds_the_log_ratio_before_k3():
    logps = torch.tensor([[-1.0, -2.0, -30.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -1.0]])  # the third token: log-ratio ref - policy = 29
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.zeros(1)
    k3 = lambda d: (torch.exp(d) - d - 1.0).mean().item()  # noqa: E731
    _, plain = grpo_loss(logps, None, ref, adv, mask, beta=1.0)
    _, clamped = grpo_loss(logps, None, ref, adv, mask, beta=1.0, kl_clamp=10.0)
    assert plain["kl_loss"] == pytest.approx(k3(torch.tensor([-0.5, 0.0, 29.0])), rel=1e-5)
    assert clamped["kl_loss"] == pytest.approx(k3(torch.tensor([-0.5, 0.0, 10.0])), rel=1e-5)
    loss, _ = grpo_loss(logps, None, ref, adv, mask, beta=1.0, kl_clamp=10.0)
    loss.backward()
    assert logps.grad[0, 2] == 0.0 and logps.grad[0, 0] != 0.0  # beyond the clamp no gradient, as in the reference


def test_token_logps_with_temperature_are_those_of_the_scaled_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 5))
    logps, entropy = token_logps_and_entropy(hidden, head(weight, None), targets, chunk_size=2, temperature=0.7)
    expected = torch.log_softmax(hidden @ weight.T / 0.7, dim=-1)
    assert torch.allclose(logps, expected.gather(-1, targets[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(entropy, -(expected.exp() * expected).sum(-1), atol=1e-5)
