"""The tiny tower's pretraining: targets read off the processor's pixels land on the right tokens, the
tower learns them, only the tower changes, and its tokens keep the random tower's scale."""

import json

import pytest
import torch
from safetensors.torch import load_file

from common import tinyworld
from common.models import encode_visual, load_model, load_processor
from common.vision_pretrain import pretrain, render_clips, token_targets


@pytest.fixture(scope="module")
def tiny_56px_model_dir(tmp_path_factory):
    """The tiny model as run.sh builds it: 56 x 56 frames, 2 x 2 tokens per temporal patch."""
    from common.models import TinySpec, build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_56px"), TinySpec(max_pixels=56 * 56))


def _scene(objects):
    return tinyworld.Scene("appearance", objects, "q", ["A. red"], "A", [], "p")


@pytest.mark.parametrize("max_pixels", [56 * 56, 112 * 112])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_targets_land_on_the_tokens_that_show_the_shape(request, arch, max_pixels):
    processor = load_processor(request.getfixturevalue({"qwen2_5_vl": "tiny_model_dir",
                                                        "qwen3_vl": "tiny_qwen3_vl_dir"}[arch]))
    vp = processor.video_processor
    vp.size = type(vp.size)(shortest_edge=28 * 28, longest_edge=max_pixels)
    # a red square in the top-left token and a green circle in the bottom-right one, all video long;
    # a blue triangle only in frame 20, the first frame of the second temporal patch
    scene = _scene([tinyworld.Obj("red", "square", 0, 64, 2, 2, 2, 2),
                    tinyworld.Obj("green", "circle", 0, 64, 86, 86, 86, 86),
                    tinyworld.Obj("blue", "triangle", 20, 21, 2, 86, 2, 86)])
    video = tinyworld.render(scene, 64, 112)
    idx = [4, 12, 20, 28, 36, 44, 52, 60]
    batch = vp(videos=[video[idx]], video_metadata=[{"fps": 8.0, "total_num_frames": 64, "frames_indices": idx}],
               do_sample_frames=False, return_tensors="pt")
    t, h, w = batch["video_grid_thw"][0].tolist()
    m = vp.merge_size
    rows, cols = h // m, w // m
    targets = token_targets(batch["pixel_values_videos"], m, vp.temporal_patch_size, vp.patch_size,
                            vp.image_mean, vp.image_std, scene)
    assert targets.shape == (t * rows * cols, len(tinyworld.COLORS))
    expected = torch.zeros_like(targets)
    red, green, blue = (list(tinyworld.COLORS).index(c) for c in ("red", "green", "blue"))
    for step in range(t):
        first = step * rows * cols
        expected[first, red] = 1 + tinyworld.SHAPES.index("square")
        expected[first + rows * cols - 1, green] = 1 + tinyworld.SHAPES.index("circle")
    expected[1 * rows * cols + (rows - 1) * cols, blue] = 1 + tinyworld.SHAPES.index("triangle")  # patch 1, bottom-left
    assert torch.equal(targets, expected)


def test_pretraining_learns_and_changes_only_the_tower(tiny_56px_model_dir, tmp_path):
    model_dir = tiny_56px_model_dir
    kwargs = dict(steps=200, scenes=288, held_out=32, batch_size=16, lr=3e-3)
    out = pretrain(model_dir, tmp_path / "a", **kwargs)
    assert json.loads((tmp_path / "a" / "vision_pretrain.json").read_text()) == out
    # held out, the targets are predicted better than by their frequencies alone (what a blind tower gives)
    assert out["held_out_loss"] < 0.9 * out["base_rate_loss"], out
    before, after = load_model(model_dir), load_model(tmp_path / "a")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    tower = {k for k in b if ".visual." in f".{k}"}
    assert changed == tower, sorted(changed ^ tower)[:5]  # every tower parameter learned, nothing else moved
    # the tokens keep the random tower's mean norm (a linear rescale of the output layer), on other scenes
    clips = render_clips(load_processor(model_dir), 16, 1)
    pixels, grids = torch.cat([c["pixels"] for c in clips]), torch.cat([c["grid"] for c in clips])
    with torch.no_grad():
        norms = [torch.stack([f[:, 0] for f in encode_visual(m, pixels, grids)]).norm(dim=-1).mean().item()
                 for m in (before, after)]
    assert norms[1] == pytest.approx(norms[0], rel=0.1)
    # the same seed gives the same tower
    pretrain(model_dir, tmp_path / "b", **{**kwargs, "steps": 20})
    pretrain(model_dir, tmp_path / "c", **{**kwargs, "steps": 20})
    wb, wc = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)


def test_pretrains_a_qwen3_vl_tower(tiny_qwen3_vl_dir, tmp_path):
    out = pretrain(tiny_qwen3_vl_dir, tmp_path / "q3", steps=3, scenes=40)
    assert out["token_norm"] == pytest.approx(out["random_token_norm"], rel=0.1)
    before, after = load_model(tiny_qwen3_vl_dir), load_model(tmp_path / "q3")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert changed and all(".visual." in f".{k}" for k in changed)


def test_refuses_a_tower_without_grids(tiny_llava_onevision_dir, tmp_path):
    with pytest.raises(ValueError, match="grid-based video tower"):
        pretrain(tiny_llava_onevision_dir, tmp_path / "x", steps=1, scenes=40, held_out=8)
