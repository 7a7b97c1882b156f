"""G sampled completions per prompt, with each prompt encoded once: GRPO's rollouts.

`model.generate(num_return_sequences=G)` copies every prompt G times before it starts: the vision tower
encodes each video G times and the language model prefills each prompt G times, although the G copies
are identical. Here the vision tower runs once per video (`visual_features`), the B prompts are prefilled
once, and their KV cache is repeated G times before decoding (the same trick the no-grad attribution
passes use). For a video prompt of P tokens and completions of Lc, the prefill's work drops from
B*G*P tokens to B*P.

Decoding is `generate`'s multinomial sampling, step for step: the same logits processors in the same
order (banned tokens, temperature, top-k, top-p with at least one token kept), one `torch.multinomial`
over all N = B*G rows per step (finished rows included, then replaced by the pad token), and the same
stop rule (every row has sampled an EOS, or max_new_tokens). So with the same RNG state it returns what
`generate_exact(..., num_return_sequences=G)` returns for the completion part; tests/test_sampling.py
checks token-for-token equality, and bench/bench_sampling.py the speed-up.

Positions continue the prompt's: after the last prompt token at position p (the M-RoPE index of the
prompt, or 1-D positions counted from the first real token, as `generate` numbers them), the t-th new
token is at p + 1 + t on every axis.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from common.attribution import VISUAL_KEYS, embed_inputs, visual_features
from common.models import position_ids, visual_layout


def prompt_positions(model, inputs: Mapping) -> torch.Tensor:
    """The positions `generate` gives a left-padded prompt: the model's M-RoPE index (3, B, P), or 1-D
    (B, P) counted from each row's first real token."""
    if visual_layout(model).mrope:
        positions = position_ids(model, inputs)
        model.model.rope_deltas = None  # get_rope_index leaves state behind that a later forward would reuse
        return positions
    return (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  banned_ids: list[int] | None = None) -> torch.Tensor:
    """Next-token logits (N, V) as `generate` samples from them: banned tokens, then temperature, then
    top-k (0 = off), then top-p (the smallest set of most likely tokens whose probability reaches top_p,
    never fewer than one token); the removed tokens get -inf."""
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(banned_ids, device=logits.device), float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the tail that holds at most 1 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_completions(model, inputs: Mapping, group_size: int, *, max_new_tokens: int, eos_ids: list[int],
                       pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       banned_ids: list[int] | None = None) -> torch.Tensor:
    """`group_size` sampled completions of each of the B processed (left-padded) prompts in `inputs`:
    (B * group_size, Lc) token ids, rows of a prompt together, each row padded with `pad_token_id` after
    its first EOS, Lc the number of decoding steps taken (at most max_new_tokens)."""
    if not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    mask = inputs["attention_mask"]
    positions = prompt_positions(model, inputs)
    embeds, deepstack = embed_inputs(model, inputs["input_ids"],
                                     visual_features(model, {k: v for k, v in inputs.items() if k in VISUAL_KEYS}),
                                     rows_per_prompt=1)
    lm, head, embed = model.model.language_model, model.get_output_embeddings(), model.get_input_embeddings()
    out = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True, **deepstack)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(group_size)
    hidden = out.last_hidden_state[:, -1].repeat_interleave(group_size, dim=0)
    mask = mask.repeat_interleave(group_size, dim=0)
    last = positions[..., -1:].repeat_interleave(group_size, dim=-2)  # (3, N, 1) or (N, 1)
    eos = torch.tensor(eos_ids, device=mask.device)
    finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = filter_logits(head(hidden).float(), temperature, top_k, top_p, banned_ids)
        token = torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or t + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = lm(inputs_embeds=embed(token[:, None]), position_ids=last + 1 + t, attention_mask=mask, cache=cache,
                 use_cache=True)  # appends this step's keys and values to `cache` in place
        hidden = out.last_hidden_state[:, -1]
    return torch.stack(tokens, dim=1)
