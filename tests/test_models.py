"""The tiny model round trip through the Auto classes, placeholder ids, and fps-aware inputs."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.models import (
    TinySpec,
    build_tiny,
    chat_text,
    load_model,
    load_processor,
    model_inputs,
    visual_tokens,
)
from common.video import Clip, read_frames


def uniform_clip(path, n=8) -> Clip:
    return read_frames(path, num_frames=n)


def test_placeholder_ids_come_from_config_and_match_tokenizer(tiny_model_dir):
    model = load_model(tiny_model_dir)
    processor = load_processor(tiny_model_dir)
    ids = visual_tokens(model.config)
    tok = processor.tokenizer
    assert ids.video == tok.convert_tokens_to_ids("<|video_pad|>")
    assert ids.image == tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.vision_start == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids.video != ids.image and len(set(ids.placeholders)) == 4


def test_visual_tokens_reads_llava_style_names_and_rejects_text_only_configs():
    llava = SimpleNamespace(video_token_index=11, image_token_index=12)
    assert visual_tokens(llava).video == 11 and visual_tokens(llava).image == 12
    with pytest.raises(ValueError, match="video-capable"):
        visual_tokens(SimpleNamespace(vocab_size=10))


def test_tiny_round_trip_forward_and_generate_on_a_real_video(tiny_model_dir, tiny_world_dir):
    model = load_model(tiny_model_dir)
    processor = load_processor(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    record = json.loads((tiny_world_dir / "test.json").read_text())[0]
    clip = uniform_clip(tiny_world_dir / record["path"])
    inputs = model_inputs(processor, [record["problem"], "Short?"], [clip, clip])
    n_video = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1)
    grid = inputs["video_grid_thw"]
    assert n_video.tolist() == (grid.prod(dim=1) // 4).tolist()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]
    # Left padding: generation appends right after every prompt.
    assert processor.tokenizer.padding_side == "left"


def test_fps_metadata_spreads_temporal_positions(tiny_model_dir, tiny_world_dir):
    model = load_model(tiny_model_dir)
    processor = load_processor(tiny_model_dir)
    record = json.loads((tiny_world_dir / "test.json").read_text())[0]
    clip = uniform_clip(tiny_world_dir / record["path"], n=8)
    inputs = model_inputs(processor, ["q"], [clip])
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"],
        attention_mask=inputs["attention_mask"])
    is_video = inputs["input_ids"][0] == model.config.video_token_id
    temporal = position_ids[0, 0][is_video].unique()
    # 8 frames = 4 temporal groups; without the fps metadata they collapse onto one or two positions.
    assert len(temporal) == 4
    expected_seconds_per_group = 2 / (len(clip.indices) / clip.total_frames * clip.fps)
    assert inputs["second_per_grid_ts"][0].item() == pytest.approx(expected_seconds_per_group)


def test_chat_text_places_video_before_question_and_appends_target(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    text = chat_text(processor, "What colour?", target="<think>x</think><answer>A</answer>")
    assert text.index("<|video_pad|>") < text.index("What colour?")
    assert text.endswith("<|im_start|>assistant\n<think>x</think><answer>A</answer><|im_end|>")


def test_qwen2_vl_arch_also_builds_and_runs(tmp_path, tiny_world_dir):
    path = build_tiny(tmp_path / "q2", TinySpec(arch="qwen2_vl"))
    model = load_model(path)
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    record = json.loads((tiny_world_dir / "train.json").read_text())[0]
    inputs = model_inputs(processor, ["q"], [uniform_clip(tiny_world_dir / record["path"], n=4)])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_build_tiny_is_deterministic_for_a_seed(tmp_path):
    a = load_model(build_tiny(tmp_path / "a", TinySpec(seed=3)))
    b = load_model(build_tiny(tmp_path / "b", TinySpec(seed=3)))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_unknown_arch_and_dtype_are_rejected(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="supported are"):
        build_tiny(tmp_path / "x", TinySpec(arch="llama"))
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        load_model(tiny_model_dir, dtype="fp8")


def test_random_frames_clip_matches_processor_token_count(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    frames = np.zeros((4, 112, 112, 3), dtype=np.uint8)
    clip = Clip(frames=frames, indices=[0, 8, 16, 24], timestamps=[0, 1, 2, 3], fps=8.0, total_frames=32)
    inputs = model_inputs(processor, ["q"], [clip])
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
