"""trackers: [tensorboard] in the three training scripts, read back with tensorboard's own reader;
wandb in offline mode."""

import subprocess
import sys

from common.launch import cpu_launch_env
from tests.conftest import ROOT


def run(script: str, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=cpu_launch_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files under log_dir (hparams go to a subfolder: one accumulator each)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for folder in {p.parent for p in log_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def test_tensorboard_event_files_of_sft_ktr_and_voyager(tiny_model_dir, answering_model_dir, tiny_world_dir, tmp_path):
    data = tiny_world_dir / "train.json"
    run("train_sft.py", [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'sft'}", "frames.num=4",
                         "batch_size=2", "max_steps=2", "log_every=1", "trackers=[tensorboard]"])
    sft = scalars(tmp_path / "sft" / "train_sft")
    assert [s for s, _ in sft["loss"]] == [1, 2] and "lr" in sft and "grad_norm" in sft

    run("train_ktr.py", [f"model={answering_model_dir}", f"data={data}", f"output_dir={tmp_path / 'ktr'}",
                         "frames.num=4", "num_generations=2", "max_new_tokens=6", "batch_size=1", "max_steps=2",
                         "trackers=[tensorboard]"])
    ktr = scalars(tmp_path / "ktr" / "train_ktr")
    for tag in ("reward", "kl", "completion_length", "selected/union", "selected/visual", "time/generation"):
        assert [s for s, _ in ktr[tag]] == [1, 2], tag
    assert "completion_length_by_rank" not in ktr  # a list: metrics.jsonl only

    run("label_frames.py", [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'labels'}",
                            "candidates=8", "num_frames=2", "max_combinations=6", "limit=8", "max_pixels=3136"])
    run("train_voyager.py", [f"labels={tmp_path / 'labels' / 'labels.jsonl'}", f"output_dir={tmp_path / 'voyager'}",
                             "layers=0", "dim=8", "epochs=2", "batch_size=4", "val_fraction=0.25",
                             "trackers=[tensorboard]"])
    voyager = scalars(tmp_path / "voyager" / "train_voyager")
    assert [s for s, _ in voyager["pair_accuracy"]] == [0, 1, 2] and [s for s, _ in voyager["train_loss"]] == [1, 2]


def test_wandb_offline_run_is_written_locally(tiny_model_dir, tiny_world_dir, tmp_path):
    run("train_sft.py", [f"model={tiny_model_dir}", f"data={tiny_world_dir / 'train.json'}",
                         f"output_dir={tmp_path}", "frames.num=4", "batch_size=2", "max_steps=2", "log_every=1",
                         "trackers=[wandb]"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list(tmp_path.rglob("*"))
