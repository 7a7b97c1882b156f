"""GRPO loss and Video-KTR key-token selection, as pure functions of tensors.

Rows are N = B prompts x G completions, grouped contiguously (rows g*G .. g*G+G-1 share
prompt g); columns are the L completion positions. Video-KTR is GRPO whose policy (and by
default KL) term only sees "key tokens": the union of per-signal top-`ratio` masks over
visual / temporal counterfactual scores and policy entropy. With no active signal the key
mask is None and `grpo_loss` is exactly plain GRPO.

Decisions (quoted by the README):

* Advantages use the unbiased group std (as TRL / Video-R1 / the Video-KTR code); a group
  whose rewards are all equal, including G = 1, gets exact zeros.
* Selection thresholds are the linear-interpolation quantile of `torch.quantile`
  (position q * (n - 1) in the sorted valid scores); ties at the threshold are all kept.
* "sequence_mean" averages over ALL rows, so a row with no selected token adds 0 and keeps
  its weight 1/N: key-token masking shrinks a sequence's voice rather than re-weighting it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

SCOPES = ("group", "sequence", "batch")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant")


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """(N,) rewards -> (N,) advantages: (r - group mean) / (unbiased group std + eps), or centring only."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # Equal rewards can leave a rounding residue in the mean; force exact zeros so no signal is invented.
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centred = centred.masked_fill(constant, 0.0)
    if scale:
        std = (centred.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        centred = centred / (std + eps)
    return centred.view(-1)


def select_by_ratio(
    scores: Tensor, valid_mask: Tensor, ratio: float, group_size: int | None = None, scope: str = "group"
) -> Tensor:
    """Bool (N, L): valid tokens scoring at or above the (1 - ratio) quantile of their scope's valid finite scores.

    Vectorised: each scope becomes one row of a (scopes, K) matrix with invalid entries as NaN,
    sorted (NaN last), and the quantile is interpolated from the n valid entries of the row.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    valid = valid_mask.bool() & torch.isfinite(scores)
    if ratio == 0.0:
        return torch.zeros_like(valid)
    n_rows = scores.shape[0]
    if scope == "group":
        if group_size is None or n_rows % group_size:
            raise ValueError(f"scope 'group' needs a group_size dividing N={n_rows}, got {group_size}")
        n_scopes = n_rows // group_size
    else:
        n_scopes = n_rows if scope == "sequence" else 1
    x = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~valid, float("nan"))
    flat, flat_valid = x.reshape(n_scopes, -1), valid.reshape(n_scopes, -1)
    ordered = flat.sort(dim=1).values
    position = (1.0 - ratio) * (flat_valid.sum(dim=1, keepdim=True) - 1).clamp(min=0).to(x.dtype)
    below, above = position.floor(), position.ceil()
    # A scope with no valid score gathers NaN, so its threshold is NaN and nothing is selected.
    threshold = torch.lerp(ordered.gather(1, below.long()), ordered.gather(1, above.long()), position - below)
    return (flat_valid & (flat >= threshold)).view_as(valid)


def counterfactual_scores(logp_real: Tensor, logp_perturbed: Tensor, mode: str = "signed") -> Tensor:
    """How much a token's log-prob depends on the evidence that the perturbation removed.

    "signed" (the paper's code) favours tokens the evidence supports; "absolute" also keeps
    tokens the evidence argues against.
    """
    diff = logp_real - logp_perturbed
    if mode == "signed":
        return diff
    if mode == "absolute":
        return diff.abs()
    raise ValueError(f"unknown counterfactual mode {mode!r}; expected 'signed' or 'absolute'")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(..., V) -> (...) predictive entropy in float32; -inf logits (banned tokens) contribute 0, not NaN."""
    return _entropy_from_logp(logits.float().log_softmax(dim=-1))


def _entropy_from_logp(logp: Tensor) -> Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


def _chunk_logps(hidden: Tensor, lm_head: Callable[[Tensor], Tensor], targets: Tensor, with_entropy: bool,
                 temperature: float = 1.0):
    logits = lm_head(hidden).float()
    logp = (logits if temperature == 1.0 else logits / temperature).log_softmax(dim=-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp, None
    # Computed after every tensor backward needs is saved, so checkpoint's early-stopping recompute skips it.
    with torch.no_grad():
        return token_logp, _entropy_from_logp(logp)


def token_logps_and_entropy(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk_size: int = 64,
    with_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-prob of `targets` (N, L) under logits lm_head(hidden) / temperature, plus detached entropy.

    `temperature` is the sampling temperature, so that the log-probs (and entropies) are those of
    the distribution the completions were sampled from (TRL does the same); 1 = the raw logits.

    A (N, L, V) float32 logits tensor is never built: logits are made chunk_size positions at a
    time and upcast per chunk. When a gradient is needed each chunk is checkpointed, so backward
    rebuilds one chunk's logits at a time instead of keeping all of them alive. `lm_head` is
    called as a module (the model's output embedding), never read as a weight: under ZeRO-3 the
    call is what gathers the sharded weight, in the forward and again in backward's recompute.
    """
    params = lm_head.parameters() if isinstance(lm_head, torch.nn.Module) else ()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    logps, entropies = [], []
    for start in range(0, hidden.shape[1], chunk_size):
        span = slice(start, start + chunk_size)
        args = (hidden[:, span], lm_head, targets[:, span])
        if needs_grad:
            token_logp, entropy = checkpoint(_chunk_logps, *args, with_entropy, temperature, use_reentrant=False)
        else:
            token_logp, entropy = _chunk_logps(*args, with_entropy, temperature)
        logps.append(token_logp)
        entropies.append(entropy)
    entropy = torch.cat(entropies, dim=1) if with_entropy else None
    return torch.cat(logps, dim=1), entropy


def key_token_mask(
    scores: dict[str, Tensor],
    ratios: dict[str, float],
    valid_mask: Tensor,
    group_size: int | None,
    scope: str = "group",
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Union of the per-signal top-ratio masks, and the per-signal masks (for logging overlap).

    A signal absent from `scores` or with ratio 0 is off. With no signal on the result is
    (None, {}) = "no key-token masking", so an all-off config is plain GRPO rather than a loss
    over zero tokens. A per-row missing signal (an image has no temporal score) is NaN there.
    """
    masks = {
        name: select_by_ratio(score, valid_mask, ratios[name], group_size, scope)
        for name, score in scores.items()
        if ratios.get(name, 0.0) > 0.0
    }
    if not masks:
        return None, {}
    union = torch.zeros_like(valid_mask, dtype=torch.bool)
    for mask in masks.values():
        union |= mask
    return union, masks


def gradient_share(logps: Tensor, advantages: Tensor, completion_mask: Tensor, masks: dict[str, Tensor]
                   ) -> dict[str, float]:
    """How much of GRPO's per-token gradient each token mask keeps (a diagnostic; nothing trains on it).

    A token's policy term A * log p(y) sends A * (1 - p(y)) to its own logit (d log p(y) / dz_y = 1 - p(y)), so a
    near-certain token carries almost no gradient whether or not it is selected. Per mask: the sum of
    |A| * (1 - p(y)) over the masked completion tokens divided by the same sum over every completion token
    (one update per rollout, before aggregation weights; 0 when no token carries gradient).
    """
    valid = completion_mask.bool()
    weight = torch.where(valid, advantages.detach().abs().unsqueeze(1) * (1.0 - logps.detach().float().exp()), 0.0)
    total = weight.sum()
    if total <= 0:
        return {name: 0.0 for name in masks}
    return {name: (torch.where(mask.bool(), weight, 0.0).sum() / total).item() for name, mask in masks.items()}


def _aggregate(values: Tensor, mask: Tensor, aggregation: str, max_completion_length: int | None) -> Tensor:
    masked = torch.where(mask, values, 0.0)
    if aggregation == "sequence_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if aggregation == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if aggregation == "constant":
        if max_completion_length is None:
            raise ValueError("aggregation 'constant' needs max_completion_length")
        return masked.sum() / (values.shape[0] * max_completion_length)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    key_token_mask: Tensor | None = None,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: str = "sequence_mean",
    max_completion_length: int | None = None,
    kl_on_all_tokens: bool = False,
    kl_clamp: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO objective + beta * k3 KL, each aggregated over its token mask.

    kl_clamp: clamp the log-ratio (ref - policy) to [-kl_clamp, kl_clamp] before k3, as the
    Video-R1 / Video-KTR code does with 10 (bounds the penalty of a token the reference finds
    near impossible); None = no clamp.

    old_logps None means one update per rollout: the ratio is 1 in value and the gradient is
    A * grad logp. Metrics: "policy_loss" and "kl_loss" are the aggregated terms
    (loss = policy_loss + beta * kl_loss); "kl" is the mean k3 over all completion tokens.
    """
    completion = completion_mask.bool()
    policy_mask = completion if key_token_mask is None else completion & key_token_mask.bool()
    kl_mask = completion if kl_on_all_tokens else policy_mask
    upper = 1.0 + (epsilon if epsilon_high is None else epsilon_high)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.unsqueeze(1).to(ratio.dtype)
    per_token_policy = -torch.min(ratio * adv, ratio.clamp(1.0 - epsilon, upper) * adv)
    policy_loss = _aggregate(per_token_policy, policy_mask, aggregation, max_completion_length)
    kl_loss, kl_metric = torch.zeros((), device=logps.device), 0.0
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    if ref_logps is not None:
        delta = ref_logps - logps
        if kl_clamp is not None:
            delta = delta.clamp(-kl_clamp, kl_clamp)
        per_token_kl = torch.exp(delta) - delta - 1.0
        kl_metric = _aggregate(per_token_kl.detach(), completion, "token_mean", None).item()
        if beta > 0:
            kl_loss = _aggregate(per_token_kl, kl_mask, aggregation, max_completion_length)
    loss = policy_loss + beta * kl_loss
    # Clipped where the clamp removes the gradient: above the band with A > 0, below it with A < 0.
    clipped = ((ratio > upper) & (adv > 0)) | ((ratio < 1.0 - epsilon) & (adv < 0))
    n_policy = policy_mask.sum().clamp(min=1)
    metrics = {
        "kl": kl_metric,
        "clip_fraction": ((clipped & policy_mask).sum() / n_policy).item(),
        "selected_fraction": (policy_mask.sum() / completion.sum().clamp(min=1)).item(),
        "policy_loss": policy_loss.item(),
        "kl_loss": kl_loss.item(),
    }
    return loss, metrics
