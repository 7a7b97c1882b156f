"""Checkpoints that a stage can resume from, written so an interruption never leaves half of one.

Layout under a stage's output_dir:
    checkpoints/step_000100/   save_pretrained model + processor, training_state/ (optimizer,
                               scheduler, RNG; accelerate's format, so ZeRO shards work), progress.json
    final/                     save_pretrained model + processor (what eval.py loads)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (progress.json is written last, so its presence means whole)."""
    done = sorted(p.parent for p in (Path(out_dir) / "checkpoints").glob("step_*/progress.json"))
    return done[-1] if done else None


def save_checkpoint(accelerator, model, processor, path: Path, progress: dict | None = None, keep: int = 0) -> None:
    """save_pretrained `model` (+ training state and `progress` when given) into `path` atomically:
    everything goes into path.tmp, which is renamed at the end. `keep` > 0 prunes older siblings."""
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    hf_model, state = accelerator.unwrap_model(model), accelerator.get_state_dict(model)
    if not hasattr(hf_model, "save_pretrained"):  # a thin module around the HF model (train_ktr's PolicyLogps)
        # (under ZeRO-3 only the main process receives the consolidated state dict; the others get None)
        hf_model = hf_model.model
        state = None if state is None else {k.removeprefix("model."): v for k, v in state.items()}
    # Loaded under ZeRO-3 (zero.Init), transformers records its legacy renamings too, and reverting
    # them on save writes "model.model.*" keys that no loader reads; the default mapping writes the
    # checkpoint format every other path writes (tests/test_train_ktr.py::test_deepspeed_configs_train).
    hf_model._weight_conversions = None
    hf_model.save_pretrained(tmp, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                             state_dict=state)
    if progress is not None:
        accelerator.save_state(str(tmp / "training_state"))
    # Every process is done with path.tmp before the main one moves it (save_pretrained lists the
    # folder on every process: a rename under its feet failed a 2-rank ZeRO-3 run once).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        processor.save_pretrained(tmp)
        if progress is not None:
            (tmp / "progress.json").write_text(json.dumps(progress))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        if keep > 0:
            for old in sorted(path.parent.glob("step_*[0-9]"))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_progress(accelerator, checkpoint: Path) -> dict:
    """Restore optimizer / scheduler / RNG state from `checkpoint`; returns its progress dict."""
    accelerator.load_state(str(checkpoint / "training_state"))
    return json.loads((checkpoint / "progress.json").read_text())
