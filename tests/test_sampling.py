"""The rollout sampler (each prompt encoded once, its KV cache shared by its G completions) returns what
`generate` returns, token for token, for every family train_ktr.py runs."""

import json

import numpy as np
import pytest
import torch

from common.models import (
    generate_exact,
    load_model,
    load_processor,
    model_inputs,
    video_format,
    visual_layout,
    visual_tokens,
)
from common.sampling import filter_logits, sample_completions
from common.video import read_frames

G = 4
SETTINGS = [dict(temperature=1.0, top_p=1.0, top_k=0), dict(temperature=0.7, top_p=0.9, top_k=20)]


def both(model, inputs, eos_ids, pad_id, seed, max_new_tokens=16, **decoding):
    """(generate's completions, ours), from the same RNG state."""
    banned = visual_tokens(model.config).placeholders
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = generate_exact(model, inputs, max_new_tokens=max_new_tokens, do_sample=True,
                                  num_return_sequences=G, bad_words_ids=[[t] for t in banned], **decoding)
    model.model.rope_deltas = None
    torch.manual_seed(seed)
    ours = sample_completions(model, inputs, G, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              pad_token_id=pad_id, banned_ids=banned, **decoding)
    return expected[:, inputs["input_ids"].shape[1]:], ours


def eos_ids_of(model, tokenizer):
    return sorted({tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()})


@pytest.mark.parametrize("decoding", SETTINGS, ids=["plain", "temperature_topk_topp"])
def test_sampler_equals_generate_for_every_family(tiny_attribution_arch_dir, tiny_world_dir, decoding):
    model = load_model(tiny_attribution_arch_dir).eval()
    processor = load_processor(tiny_attribution_arch_dir)
    records = json.loads((tiny_world_dir / "train.json").read_text())
    # Prompts of different lengths (left padding); a fixed-frame-size processor needs equal frame counts.
    lengths = (8, 8) if video_format(processor).fixed_frame_size else (8, 4)
    clips = [read_frames(tiny_world_dir / r["path"], num_frames=n) for r, n in zip(records[:2], lengths, strict=True)]
    batches = [(["A short question?", records[1]["problem"]], clips)]
    if visual_layout(model).image_grids:  # a video and an image in one batch (Qwen-VL)
        image = np.asarray(read_frames(tiny_world_dir / records[2]["path"], indices=[5]).frames[0])
        batches.append(([records[0]["problem"], "An image?"], [clips[0], image]))
    eos_ids, pad_id = eos_ids_of(model, processor.tokenizer), processor.tokenizer.pad_token_id
    for prompts, visuals in batches:
        inputs = model_inputs(processor, prompts, visuals)
        assert inputs["attention_mask"].min() == 0  # the rows really are padded
        for seed in range(3):
            expected, ours = both(model, inputs, eos_ids, pad_id, seed, **decoding)
            assert ours.shape == (2 * G, expected.shape[1])
            assert torch.equal(ours, expected), (prompts, seed)


def test_sampler_stops_and_pads_rows_like_generate(answering_model_dir, tiny_world_dir):
    """A model that writes `<answer>X</answer>` and stops: rows end at different steps, the ended rows are
    padded, and the call stops when every row has ended, as generate does."""
    model = load_model(answering_model_dir).eval()
    processor = load_processor(answering_model_dir)
    tokenizer = processor.tokenizer
    records = json.loads((tiny_world_dir / "test.json").read_text())[:3]
    inputs = model_inputs(processor, [r["problem"] for r in records],
                          [read_frames(tiny_world_dir / r["path"], num_frames=4) for r in records])
    eos_ids = eos_ids_of(model, tokenizer)
    ended_early = 0
    for seed in range(3):
        expected, ours = both(model, inputs, eos_ids, tokenizer.pad_token_id, seed, max_new_tokens=40)
        assert torch.equal(ours, expected), seed
        assert expected.shape[1] < 40  # every row ended before the limit
        is_eos = torch.isin(ours, torch.tensor(eos_ids))
        assert is_eos.any(dim=1).all()
        first = is_eos.int().argmax(dim=1)
        ended_early += int((first < ours.shape[1] - 1).sum())
        for row, end in zip(ours, first.tolist(), strict=True):
            assert (row[end + 1:] == tokenizer.pad_token_id).all()
    assert ended_early > 0  # some rows ended before others: the padding path ran


def test_filter_logits_known_answers():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    inf = float("-inf")
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    # top-p 0.75: the two most likely (0.5 + 0.3) reach it; 0.15 and 0.05 (together 0.2 <= 0.25) go.
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, False, True]
    # A top_p below the largest probability keeps that one token.
    assert kept(filter_logits(logits, top_p=0.1)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_k=3)) == [False, True, True, True]
    out = filter_logits(logits, banned_ids=[1], temperature=0.5)
    assert out[0, 1] == inf and torch.allclose(out[0, [0, 2, 3]], logits[0, [0, 2, 3]] / 0.5)
    assert torch.equal(filter_logits(logits), logits)  # the defaults change nothing


def test_sampler_checks_its_decoding_values(tiny_model_dir):
    model = load_model(tiny_model_dir)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_completions(model, inputs, 2, max_new_tokens=3, eos_ids=[0], pad_token_id=0, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_completions(model, inputs, 2, max_new_tokens=3, eos_ids=[0], pad_token_id=0, top_p=0.0)
