"""The tiny model round trip through the Auto classes, placeholder ids, and fps-aware inputs."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.frames import FramesConfig
from common.models import (
    TinySpec,
    build_tiny,
    chat_text,
    generate_exact,
    load_model,
    load_processor,
    model_inputs,
    video_format,
    video_max_pixels,
    visual_tokens,
)
from common.video import Clip, read_frames


def uniform_clip(path, n=8) -> Clip:
    return read_frames(path, num_frames=n)


def test_placeholder_ids_come_from_config_and_match_tokenizer(tiny_arch_dir):
    model = load_model(tiny_arch_dir)
    processor = load_processor(tiny_arch_dir)
    ids = visual_tokens(model.config)
    tok = processor.tokenizer
    assert ids.video == tok.convert_tokens_to_ids(processor.video_token)
    assert ids.image == tok.convert_tokens_to_ids(processor.image_token)
    # Qwen-VL wraps visual tokens in <|vision_start|> ... <|vision_end|>; LLaVA-OneVision has no wrapper.
    wrapper = [tok.get_vocab().get(t) for t in ("<|vision_start|>", "<|vision_end|>")]
    assert [ids.vision_start, ids.vision_end] == wrapper
    assert ids.video != ids.image and len(set(ids.placeholders)) == 2 + 2 * (wrapper[0] is not None)


def test_visual_tokens_reads_llava_style_names_and_rejects_text_only_configs():
    llava = SimpleNamespace(video_token_index=11, image_token_index=12)
    assert visual_tokens(llava).video == 11 and visual_tokens(llava).image == 12
    with pytest.raises(ValueError, match="video-capable"):
        visual_tokens(SimpleNamespace(vocab_size=10))


MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def expected_video_tokens(config, inputs, n_frames: int) -> list[int]:
    """Qwen-VL: one token per 2 x 2 merged patches of its grid. LLaVA-OneVision: every frame's patch grid
    pooled 2 x 2 (rounding up), then one newline token per video."""
    if "video_grid_thw" in inputs:
        return (inputs["video_grid_thw"].prod(dim=1) // 4).tolist()
    side = config.vision_config.image_size // config.vision_config.patch_size
    return [n_frames * math.ceil(side / 2) ** 2 + 1] * len(inputs["input_ids"])


def test_tiny_round_trip_forward_and_generate_on_a_real_video(tiny_arch_dir, tiny_world_dir):
    model = load_model(tiny_arch_dir)
    processor = load_processor(tiny_arch_dir)
    assert type(model).__name__ == MODEL_CLASSES[model.config.model_type]
    record = json.loads((tiny_world_dir / "test.json").read_text())[0]
    clip = uniform_clip(tiny_world_dir / record["path"])
    inputs = model_inputs(processor, [record["problem"], "Short?"], [clip, clip])
    n_video = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1)
    assert n_video.tolist() == expected_video_tokens(model.config, inputs, len(clip.indices))
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


def test_chat_text_places_video_before_question_and_appends_target(tiny_arch_dir):
    processor = load_processor(tiny_arch_dir)
    text = chat_text(processor, "What colour?", target="<think>x</think><answer>A</answer>")
    assert text.index(processor.video_token) < text.index("What colour?")
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


@pytest.fixture(scope="module")
def checkpoint_with_decoding_defaults(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a generation_config.json like Qwen2.5-VL's (sampling defaults + a penalty)."""
    import shutil

    out = tmp_path_factory.mktemp("tiny_with_generation_defaults") / "model"
    shutil.copytree(tiny_model_dir, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(repetition_penalty=1.5, top_k=3, top_p=0.5, temperature=0.3, do_sample=True)
    path.write_text(json.dumps(config))
    return out


def test_generate_exact_ignores_the_checkpoints_decoding_defaults(tiny_model_dir, tiny_world_dir,
                                                                  checkpoint_with_decoding_defaults):
    plain, loaded = load_model(tiny_model_dir), load_model(checkpoint_with_decoding_defaults)
    assert loaded.generation_config.repetition_penalty == 1.5
    processor = load_processor(tiny_model_dir)
    record = json.loads((tiny_world_dir / "test.json").read_text())[0]
    inputs = model_inputs(processor, [record["problem"]], [uniform_clip(tiny_world_dir / record["path"], 4)])

    def run(model, **kwargs):
        torch.manual_seed(0)
        with torch.no_grad():
            return generate_exact(model, inputs, max_new_tokens=24, **kwargs)

    for kwargs in (dict(do_sample=False), dict(do_sample=True, num_return_sequences=4),
                   dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, num_return_sequences=4)):
        expected = run(plain, **kwargs)
        assert torch.equal(run(loaded, **kwargs), expected), kwargs
        assert expected.shape[1] > inputs["input_ids"].shape[1]
    assert loaded.generation_config.repetition_penalty == 1.5  # restored after the call

    # Without generate_exact the checkpoint's defaults leak in: greedy gets the penalty, sampling its top_k.
    with torch.no_grad():
        greedy = loaded.generate(**inputs, max_new_tokens=24, do_sample=False)
        torch.manual_seed(0)
        sampled = loaded.generate(**inputs, max_new_tokens=24, do_sample=True, temperature=1.0, top_p=1.0,
                                  num_return_sequences=4)
    assert not torch.equal(greedy, run(plain, do_sample=False))
    assert not torch.equal(sampled, run(plain, do_sample=True, num_return_sequences=4))


def test_generate_exact_greedy_raises_no_flag_warnings_and_checks_sampling_values(tiny_model_dir, caplog):
    model = load_model(tiny_model_dir)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with caplog.at_level("WARNING"):
        generate_exact(model, inputs, max_new_tokens=3, do_sample=False, temperature=0.1, top_p=0.01, top_k=5)
    assert not [r for r in caplog.records if "do_sample" in r.getMessage()]
    with pytest.raises(ValueError, match="temperature > 0"):
        generate_exact(model, inputs, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_exact(model, inputs, max_new_tokens=3, do_sample=True, top_p=0.0)


def test_pixel_budgets_change_the_grids_and_default_keeps_the_saved_resolution(tiny_model_dir):
    frames = np.random.default_rng(0).integers(0, 255, (4, 240, 320, 3), dtype=np.uint8)
    clip = Clip(frames=frames, indices=[0, 1, 2, 3], timestamps=[0, 0.5, 1, 1.5], fps=2.0, total_frames=4)

    def grids(processor):
        video = model_inputs(processor, ["q"], [clip])["video_grid_thw"].tolist()
        image = model_inputs(processor, ["q"], [frames[0]])["image_grid_thw"].tolist()
        return video, image

    saved = load_processor(tiny_model_dir)  # the tiny processor caps at 112 x 112 = 12544 pixels
    assert grids(saved) == grids(load_processor(tiny_model_dir, FramesConfig())) == ([[2, 6, 8]], [[1, 6, 8]])
    budget = load_processor(tiny_model_dir, FramesConfig(max_pixels=56 * 56, image_max_pixels=84 * 84))
    # 320 x 240 under 3136 pixels -> 28 x 56 (grid 2 x 4 of 14-px patches); under 84 x 84 -> 56 x 84 (4 x 6)
    assert grids(budget) == ([[2, 2, 4]], [[1, 4, 6]])
    assert video_max_pixels(budget) == 56 * 56 and video_max_pixels(saved) == 112 * 112
    only_video = load_processor(tiny_model_dir, FramesConfig(max_pixels=56 * 56))
    assert grids(only_video) == ([[2, 2, 4]], [[1, 6, 8]])


def test_qwen3_vl_token_layout_is_one_timestamped_block_per_temporal_patch(tiny_qwen3_vl_dir):
    """The layout real Qwen3-VL checkpoints were trained on: `<t seconds><|vision_start|>pads<|vision_end|>`
    per temporal patch, t = the mean time of its 2 frames from their true indices and fps, with no wrapper
    around the blocks (transformers 5.24 alone would nest them inside the template's own wrapper)."""
    processor = load_processor(tiny_qwen3_vl_dir)
    assert video_format(processor).timestamps_as_text
    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    # frames 3, 5 | 20, 30 at 10 fps: (0.3 + 0.5) / 2 = 0.4 s and (2.0 + 3.0) / 2 = 2.5 s
    clip = Clip(frames=frames, indices=[3, 5, 20, 30], timestamps=[0.3, 0.5, 2.0, 3.0], fps=10.0, total_frames=40)
    inputs = model_inputs(processor, ["What?"], [clip])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # 64 px = 4 patches of 16; 2 x 2 tokens per patch
    pads = "<|video_pad|>" * 4
    expected = (f"<|im_start|>user\n<0.4 seconds><|vision_start|>{pads}<|vision_end|>"
                f"<2.5 seconds><|vision_start|>{pads}<|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == expected


def test_qwen2_5_vl_layout_keeps_one_wrapper_and_no_timestamp_text(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    assert not video_format(processor).timestamps_as_text
    clip = Clip(frames=np.zeros((4, 56, 56, 3), dtype=np.uint8), indices=[3, 5, 20, 30],
                timestamps=[0.3, 0.5, 2.0, 3.0], fps=10.0, total_frames=40)
    text = processor.tokenizer.decode(model_inputs(processor, ["What?"], [clip])["input_ids"][0])
    assert text == f"<|im_start|>user\n<|vision_start|>{'<|video_pad|>' * 8}<|vision_end|>What?<|im_end|>\n" \
                   "<|im_start|>assistant\n"


@pytest.mark.parametrize("strategy", ["uniform", "fps", "all", "retrieval", "aks", "dpp"])
def test_qwen3_vl_timestamps_are_the_selected_frames_true_times(tiny_qwen3_vl_dir, tiny_world_dir, strategy):
    from common.data import load_samples
    from common.frames import make_selector

    model, processor = load_model(tiny_qwen3_vl_dir), load_processor(tiny_qwen3_vl_dir)
    sample = load_samples(tiny_world_dir / "test.json")[0]
    cfg = FramesConfig(strategy=strategy, num=4, fps=2.0, max_frames=6, candidates=8)
    clip = make_selector(cfg, model=model, processor=processor)(sample)
    text = processor.tokenizer.decode(model_inputs(processor, ["q"], [clip])["input_ids"][0])
    indices = clip.indices + clip.indices[-1:] * (len(clip.indices) % 2)  # an odd last frame is repeated
    expected = [f"{(a + b) / 2 / clip.fps:.1f}" for a, b in zip(indices[::2], indices[1::2], strict=True)]
    assert re.findall(r"<([0-9.]+) seconds>", text) == expected
    assert text.count("<|vision_start|>") == len(expected)


def test_qwen3_vl_pixel_budget_is_per_frame_whatever_the_frame_count(tiny_qwen3_vl_dir):
    """Qwen3-VL's video size is a budget for the whole video; frames.max_pixels stays a per-frame cap."""
    processor = load_processor(tiny_qwen3_vl_dir, FramesConfig(max_pixels=64 * 64))
    assert video_format(processor).size_per_video and video_max_pixels(processor) == 64 * 64

    def grid(n):
        frames = np.zeros((n, 240, 320, 3), dtype=np.uint8)
        clip = Clip(frames=frames, indices=list(range(n)), timestamps=list(range(n)), fps=1.0, total_frames=n)
        return model_inputs(processor, ["q"], [clip])["video_grid_thw"][0].tolist()

    assert grid(4) == [2, 2, 4] and grid(16) == [8, 2, 4]  # 240 x 320 under 4096 px -> 32 x 64 either way


def test_llava_onevision_layout_is_pooled_frames_then_one_newline_token_at_a_fixed_frame_size(
        tiny_llava_onevision_dir):
    """LLaVA-OneVision (HF layout): `<|im_start|>user <video>...` then the question on its own line; a video of
    any frame size is resized to the vision tower's 112 x 112 (8 x 8 patches of 14 px, pooled to 4 x 4 = 16
    tokens per frame) plus one newline token; time reaches the model only through the frames' order."""
    processor = load_processor(tiny_llava_onevision_dir)
    fmt = video_format(processor)
    assert fmt.fixed_frame_size and not fmt.timestamps_as_text and video_max_pixels(processor) == 112 * 112
    for size in ((56, 56), (240, 320)):
        clip = Clip(frames=np.zeros((4, *size, 3), dtype=np.uint8), indices=[3, 5, 20, 30],
                    timestamps=[0.3, 0.5, 2.0, 3.0], fps=10.0, total_frames=40)
        inputs = model_inputs(processor, ["What?"], [clip])
        assert inputs["pixel_values_videos"].shape == (1, 4, 3, 112, 112) and "video_grid_thw" not in inputs
        assert processor.tokenizer.decode(inputs["input_ids"][0]) == \
            f"<|im_start|>user {'<video>' * (4 * 16 + 1)}\nWhat?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="leave the budget at 0: frames.max_pixels"):
        load_processor(tiny_llava_onevision_dir, FramesConfig(max_pixels=56 * 56))


def test_llava_onevision_answers_an_image_and_a_video_in_one_batch(tiny_llava_onevision_dir):
    """Video-R1 data mixes images and videos: an image is tiled "anyres" (here a 90 x 200 image picks the
    112 x 224 tiling: base view + 2 tiles) and shares the batch with a video."""
    model, processor = load_model(tiny_llava_onevision_dir), load_processor(tiny_llava_onevision_dir)
    clip = Clip(frames=np.zeros((4, 112, 112, 3), dtype=np.uint8), indices=[0, 1, 2, 3], timestamps=[0, 1, 2, 3],
                fps=1.0, total_frames=4)
    inputs = model_inputs(processor, ["q", "r"], [np.zeros((90, 200, 3), dtype=np.uint8), clip])
    assert inputs["pixel_values"].shape[1] == 3
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
