"""train_sft.py: loss only on the assistant answer, checkpoints eval.py can load, exact resume."""

import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from common.data import build_prompt, build_target, load_samples
from common.frames import FramesConfig, make_selector
from common.jsonl import read_jsonl
from common.models import load_model, load_processor, model_inputs
from tests.conftest import ROOT
from train_sft import param_groups, supervised_labels


def test_only_the_answer_and_eos_are_supervised(tiny_arch_dir, tiny_world_dir):
    processor = load_processor(tiny_arch_dir)
    samples = load_samples(tiny_world_dir / "train.json")[:3]
    select = make_selector(FramesConfig(num=4))
    targets = [build_target(s) for s in samples]
    inputs = model_inputs(processor, [build_prompt(s) for s in samples], [select(s) for s in samples], targets)
    tok = processor.tokenizer
    lengths = [len(tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]) for t in targets]
    labels = supervised_labels(inputs["input_ids"], lengths)
    for row, target in enumerate(targets):
        supervised = labels[row][labels[row] != -100]
        assert tok.decode(supervised) == target + tok.eos_token
    assert (labels != -100).sum() == sum(lengths)


def sft(args):
    proc = subprocess.run([sys.executable, "train_sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_vision_lr_puts_the_vision_encoder_in_its_own_group(tiny_model_dir):
    model = load_model(tiny_model_dir)
    vision = {id(p) for p in model.get_encoder("video").parameters()}
    assert [len(g["params"]) for g in param_groups(model)] == [len(list(model.parameters()))]
    groups = param_groups(model, vision_lr=1e-5)
    assert [id(p) for g in groups for p in g["params"]] == [id(p) for p in model.parameters() if id(p) not in vision] \
        + [id(p) for p in model.parameters() if id(p) in vision]  # every parameter once; the LM's first
    assert {id(p) for p in groups[1]["params"]} == vision and groups[1]["lr"] == 1e-5 and "lr" not in groups[0]
    # Adam's first step moves every weight by about its group's lr, whatever the gradient's size
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    optimizer.step()
    step = {id(p): (before[id(p)] - p.detach()).abs().max().item() for p in model.parameters()}
    assert all(abs(step[i] - 1e-5) < 1e-7 for i in vision)
    assert all(abs(d - 1e-3) < 1e-5 for i, d in step.items() if i not in vision)
    model.get_encoder("video").requires_grad_(False)  # frozen vision: the LM's group alone
    assert len(param_groups(model, vision_lr=1e-5)) == 1


def test_a_few_steps_on_one_batch_lower_the_loss(tiny_arch_dir, tiny_world_dir, tmp_path):
    sft([f"model={tiny_arch_dir}", f"data={tiny_world_dir / 'train.json'}", f"output_dir={tmp_path}",
         "frames.num=4", "batch_size=8", "max_steps=6", "lr=1e-3", "log_every=1"])
    losses = [m["loss"] for m in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses  # 8 samples: every step sees the same batch
    load_model(tmp_path / "final")


def test_random_frames_are_drawn_anew_each_epoch_and_again_on_resume(tiny_model_dir, tiny_world_dir, tmp_path):
    """frames.strategy=random: train_sft calls set_epoch, so epoch e draws the subsets of (seed, e), and a
    run resumed inside epoch 1 draws epoch 1's, not epoch 0's again. The draws are logged by wrapping the
    selector inside the training process."""
    import json

    log = tmp_path / "draws.jsonl"
    wrapper = (
        "import json, runpy, sys\n"
        "import common.frames as frames\n"
        "positions = frames.RandomSubsetSelector.positions\n"
        "def logged(self, problem_id, m):\n"
        "    out = positions(self, problem_id, m)\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps([self.epoch, str(problem_id), out]) + '\\n')\n"
        "    return out\n"
        "frames.RandomSubsetSelector.positions = logged\n"
        "sys.argv = ['train_sft.py', *sys.argv[1:]]\n"
        "runpy.run_path('train_sft.py', run_name='__main__')\n")
    base = [f"model={tiny_model_dir}", f"data={tiny_world_dir / 'train.json'}", "frames.strategy=random",
            "frames.candidates=16", "frames.num=4", "frames.seed=5", "batch_size=8", "max_steps=3", "lr=1e-4"]

    def run(*args):
        proc = subprocess.run([sys.executable, "-c", wrapper, *base, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        draws = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return draws

    draws = run(f"output_dir={tmp_path / 'full'}")  # 8 samples, one batch of 8: an epoch per step
    assert [d[0] for d in draws] == [0] * 8 + [1] * 8 + [2] * 8
    select = make_selector(FramesConfig(strategy="random", candidates=16, num=4, seed=5))
    for epoch, pid, positions in draws:
        select.set_epoch(epoch)
        assert positions == select.positions(pid, 16)
    by_epoch = [{pid: tuple(p) for e, pid, p in draws if e == epoch} for epoch in range(3)]
    assert len(by_epoch[0]) == 8 and by_epoch[0] != by_epoch[1] != by_epoch[2]
    run(f"output_dir={tmp_path / 'resumed'}", "save_every=1", "stop_after=1")
    assert run(f"output_dir={tmp_path / 'resumed'}") == draws[8:]  # epochs 1 and 2, as the whole run drew them


def test_resumed_run_ends_with_the_same_weights_and_checkpoints_load(tiny_model_dir, tiny_world_dir, tmp_path):
    base = [f"model={tiny_model_dir}", f"data={tiny_world_dir / 'train.json'}", "frames.num=4", "batch_size=2",
            "grad_accum=2", "max_steps=4", "save_every=2", "lr=1e-3", "log_every=1"]
    sft([*base, f"output_dir={tmp_path / 'full'}"])
    sft([*base, f"output_dir={tmp_path / 'resumed'}", "stop_after=3"])
    assert not (tmp_path / "resumed" / "final").exists()
    # as if killed after step 3 was logged but before its checkpoint: it resumes at step 2, logs step 3 again
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000003")
    proc = sft([*base, f"output_dir={tmp_path / 'resumed'}"])
    assert [m["step"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "resumed from" in proc.stdout + proc.stderr
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name
    before = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(before[n], t) for n, t in full.items()), "training changed nothing"
    metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics)
    load_model(tmp_path / "full" / "checkpoints" / "step_000002")  # periodic checkpoints load like a model


def test_broken_video_is_recorded_and_skipped_or_stops_the_run(tiny_model_dir, tiny_world_dir, tmp_path):
    import json

    data = tmp_path / "data"
    shutil.copytree(tiny_world_dir, data)
    record = json.loads((data / "train.json").read_text())[0]
    (data / record["path"]).write_bytes(b"not a video")
    base = [f"model={tiny_model_dir}", f"data={data / 'train.json'}", "frames.num=4", "batch_size=8", "max_steps=2"]
    sft([*base, f"output_dir={tmp_path / 'skip'}"])
    skipped = read_jsonl(tmp_path / "skip" / "skipped.jsonl")
    assert {r["problem_id"] for r in skipped} == {str(record["problem_id"])}
    assert record["path"].split("/")[-1] in skipped[0]["error"]
    proc = subprocess.run([sys.executable, "train_sft.py", *base, f"output_dir={tmp_path / 'stop'}",
                           "on_bad_video=stop"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and record["path"].split("/")[-1] in proc.stderr
    # A data file none of whose videos exists (a copy moved away from its videos) is refused, not "trained" on.
    moved = tmp_path / "moved.json"
    shutil.copy(data / "train.json", moved)
    proc = subprocess.run([sys.executable, "train_sft.py", *base, f"data={moved}", f"output_dir={tmp_path / 'moved'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "moved.json: none of its 8 media files exists" in proc.stderr
    assert not (tmp_path / "moved" / "final").exists()


def test_deepspeed_zero3_trains_with_accumulation_and_saves_a_whole_model(tiny_model_dir, tiny_world_dir, tmp_path):
    """configs/accelerate/zero3.yaml really through DeepSpeed (CPU accelerator, one process): the
    script's batch and accumulation reach DeepSpeed's config, and the final model is whole and loads."""
    import yaml

    from common.launch import cpu_launch_env, launch_command

    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    config.update(num_processes=1, use_cpu=False, mixed_precision="no")
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    args = [f"model={tiny_model_dir}", f"data={tiny_world_dir / 'train.json'}", "frames.num=4", "batch_size=2",
            "grad_accum=2", "max_steps=2", "lr=1e-3", "log_every=1", f"output_dir={tmp_path / 'out'}"]
    cmd = launch_command("train_sft.py", args, num_processes=1, accelerate_config=str(tmp_path / "zero3.yaml"),
                         main_process_port=29651)
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(deepspeed=True), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "accelerate: DEEPSPEED ZeRO-3, 1 process(es) on cpu" in proc.stdout
    assert [m["step"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1, 2]
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "out" / "final" /
                                                                                "model.safetensors")
    assert before.keys() == after.keys()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 0.01, moved  # 2 Adam steps of lr 1e-3 from the loaded weights
    load_model(tmp_path / "out" / "final")
