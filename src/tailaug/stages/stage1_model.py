"""The stage-1 model outside training: its files, building it, loading a finished one.

Later stages and ``tailaug evaluate`` load a finished stage 1 here: the data, the network
with the last checkpoint's weights and the batch transform, on the run's device and
precision. No optimizer, sampler, process group or global reseed is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.datasets import LTData, Split, build_data
from ..data.loaders import Batches
from ..data.natural import pipeline
from ..data.transforms import BatchTransform
from ..engine.checkpoint import atomic_write_text, load_checkpoint, load_state
from ..engine.device import resolve_device, resolve_precision
from ..engine.inference import OUTPUTS, collect_outputs, iter_outputs
from ..errors import CheckpointError, TailaugError
from ..evaluation.report import read_json, write_json
from ..models import Network, build_model, input_spec
from .keys import changed_fields, stage1_key


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def mid_epoch_path(run_dir: Path) -> Path:
    """``checkpoints/mid_epoch.pt``: the last of the checkpoints ``train.checkpoint_every_steps``
    writes within an epoch; deleted once that epoch's ``last.pt`` is written."""
    return Path(run_dir) / "checkpoints" / "mid_epoch.pt"


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a stage-1 checkpoint to resume (an epoch's end or a mid-epoch one)."""
    return checkpoint_path(run_dir).is_file() or mid_epoch_path(run_dir).is_file()


def marker_path(run_dir: Path) -> Path:
    """``stage1.json``: written when stage 1 finished, with the key of its config."""
    return Path(run_dir) / "stage1.json"


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / "config.yaml"


def write_run_config(cfg: Config, run_dir: Path) -> None:
    atomic_write_text(config_path(run_dir), cfg.to_yaml())


def classes_path(run_dir: Path) -> Path:
    """``classes.json``: the class names by label and the image channels of the run's data."""
    return Path(run_dir) / "classes.json"


def write_classes(data: LTData, run_dir: Path) -> None:
    names = data.class_names or [str(c) for c in range(data.num_classes)]
    write_json(classes_path(run_dir), {"names": list(names), "in_channels": data.in_channels})


def finished_key(run_dir: Path) -> str | None:
    """The stage-1 key ``stage1.json`` records, or None when stage 1 has not finished."""
    path = marker_path(run_dir)
    if not path.is_file():
        return None
    fix = ("delete it and rerun 'tailaug run' or 'tailaug train --resume' with the run's config: stage 1 "
           "is then finished again from checkpoints/last.pt without training")
    return read_json(path, fix=fix, keys=("key",))["key"]


def is_complete(run_dir: Path, cfg: Config) -> bool:
    """True when ``run_dir`` holds a finished stage 1 trained with this config."""
    return finished_key(run_dir) == stage1_key(cfg)


def other_model_error(what: str, run_dir: Path, cfg: Config) -> CheckpointError:
    """The error for ``what`` (stage 1 or its checkpoint) trained with other stage-1 fields than
    ``cfg``'s: which fields differ from the run's config.yaml, or that config.yaml itself no
    longer matches the model (edited after training)."""
    try:
        from ..config import load_config

        fields = changed_fields(load_config(config_path(run_dir), saved=True), cfg)
    except TailaugError:
        fields = []
    if fields:
        return CheckpointError(
            f"{what} was trained with another {', '.join(fields)} (fields that change the stage-1 model); use "
            f"the config saved in {config_path(run_dir)}, or another run.name for this config (nothing was changed)"
        )
    return CheckpointError(
        f"{what} was trained with other stage-1 settings than {config_path(run_dir)} now gives (was it edited "
        "after training?); restore the config it was trained with, or train this config under another "
        "run.name (nothing was changed)"
    )


CHECKPOINT_ENTRIES = ("epoch", "key", "model", "optimizer", "scaler", "best")  # what Trainer.state saves
# what a mid-epoch checkpoint adds (Trainer.save_mid_epoch): "epoch" is then the epoch in progress
MID_EPOCH_ENTRIES = ("step", "world_size", "streams", "totals", "elapsed")


def checkpoint_fix(run_dir: Path) -> str:
    """What to do about a damaged stage-1 checkpoint."""
    return ("tailaug keeps only the last epoch's checkpoint, so there is no earlier one to resume or "
            f"evaluate from: train stage 1 again under another run.name, or delete {run_dir} and rerun")


def mid_epoch_fix(run_dir: Path) -> str:
    """What to do about a mid-epoch checkpoint that cannot be resumed."""
    return (f"delete {mid_epoch_path(run_dir)} to resume from the end of the last finished epoch "
            "(checkpoints/last.pt, if any), or start again under another run.name")


def load_stage1_checkpoint(run_dir: Path, device: str | torch.device = "cpu", *, mid_epoch: bool = False) -> dict:
    """checkpoints/last.pt of ``run_dir`` (``mid_epoch``: checkpoints/mid_epoch.pt) holding every
    entry of ``Trainer.state`` (and of a mid-epoch checkpoint); a CheckpointError that says what
    to do when it is unreadable or holds something else."""
    if mid_epoch:
        path, fix, entries = mid_epoch_path(run_dir), mid_epoch_fix(run_dir), CHECKPOINT_ENTRIES + MID_EPOCH_ENTRIES
    else:
        path, fix, entries = checkpoint_path(run_dir), checkpoint_fix(run_dir), CHECKPOINT_ENTRIES
    ckpt = load_checkpoint(path, device, fix=fix)
    missing = [k for k in entries if k not in ckpt] if isinstance(ckpt, dict) else entries
    if missing or not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["model"], dict):
        what = f"without {', '.join(missing)}" if missing else "with a malformed epoch or model entry"
        raise CheckpointError(f"checkpoint {path} is not a tailaug stage-1 checkpoint (a {type(ckpt).__name__} "
                              f"{what}); {fix}")
    return ckpt


def check_checkpoint(run_dir: Path, cfg: Config, *, device: str | torch.device = "cpu",
                     mid_epoch: bool = False) -> dict:
    """The run's last checkpoint (``mid_epoch``: its mid-epoch one); raises unless it was trained
    with this config's stage-1 fields."""
    ckpt = load_stage1_checkpoint(run_dir, device, mid_epoch=mid_epoch)
    if ckpt["key"] != stage1_key(cfg):
        raise other_model_error(str(mid_epoch_path(run_dir) if mid_epoch else checkpoint_path(run_dir)), run_dir, cfg)
    return ckpt


def resume_checkpoint(run_dir: Path, cfg: Config) -> tuple[Path, dict]:
    """The checkpoint a resumed stage 1 continues from, loaded on the CPU and checked as
    :func:`check_checkpoint` does: ``mid_epoch.pt`` when it lies beyond ``last.pt`` (written
    in an epoch after the last finished one), else ``last.pt``."""
    mid = check_checkpoint(run_dir, cfg, mid_epoch=True) if mid_epoch_path(run_dir).is_file() else None
    last = check_checkpoint(run_dir, cfg) if checkpoint_path(run_dir).is_file() or mid is None else None
    if mid is not None and (last is None or mid["epoch"] > last["epoch"]):
        return mid_epoch_path(run_dir), mid
    return checkpoint_path(run_dir), last


def build_network(cfg: Config, data: LTData, device: torch.device, *, initial_weights: bool = True) -> Network:
    """The stage-1 network for ``data`` on ``device`` (channels-last when configured).
    ``initial_weights=False`` skips ``model.weights``, for a model a checkpoint then fills."""
    model_cfg = cfg.model if initial_weights else cfg.model.model_copy(update={"weights": None})
    model = build_model(model_cfg, data.num_classes, data.in_channels).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_transform(cfg: Config, data: LTData, model: Network | None = None) -> BatchTransform:
    """The batch transform of ``data`` for ``model``: a pretrained backbone's input size,
    channels and normalisation (``models.input_spec``), else the dataset's normalisation."""
    return preprocessing(cfg, data.mean, data.std, input_spec(model) if model is not None else None)


def preprocessing(cfg: Config, mean, std, spec=None) -> BatchTransform:
    """The batch transform: normalisation (a pretrained backbone's, else ``mean``/``std``), with
    the small pipeline's crop and flip; natural views arrive augmented from the loader."""
    small = pipeline(cfg.data) != "natural"
    padding, flip = (cfg.data.crop_padding, cfg.data.flip) if small else (0, False)
    if spec is None:
        return BatchTransform(mean, std, padding, flip, cfg.train.channels_last)
    return BatchTransform(spec.mean, spec.std, padding, flip, cfg.train.channels_last,
                          size=spec.size, channels=spec.channels)


@dataclass
class Stage1Model:
    cfg: Config
    data: LTData
    model: Network
    transform: BatchTransform
    device: torch.device
    dtype: torch.dtype | None

    def outputs(self, split: Split, batch_size: int, *, augment: bool = False, seed: int = 0) -> dict:
        """Features, logits, labels and indices of ``split`` (eval mode, no gradients)."""
        return collect_outputs(self.model, self._batches(split, batch_size, augment, seed), self.device, self.dtype)

    def batches_out(self, split: Split, batch_size: int, *, augment: bool = False, seed: int = 0, keys=OUTPUTS):
        """:meth:`outputs` a batch at a time (dicts of CPU tensors), only ``keys`` of them
        (``engine.inference.iter_outputs``: the others stay on the device)."""
        return iter_outputs(self.model, self._batches(split, batch_size, augment, seed), self.device, self.dtype,
                            keys)

    def _batches(self, split: Split, batch_size: int, augment: bool, seed: int) -> Batches:
        return Batches(split, batch_size, self.transform, self.device, augment=augment, seed=seed,
                       num_workers=self.cfg.data.num_workers, prefetch_factor=self.cfg.data.prefetch_factor)


def load_finished(cfg: Config, run_dir: Path) -> Stage1Model:
    """The finished stage 1 of ``run_dir``; raises a :class:`TailaugError` when stage 1 has
    not finished, or was trained with other stage-1 fields than ``cfg``'s."""
    run_dir = Path(run_dir)
    done = finished_key(run_dir)
    if done is None:
        raise TailaugError(
            f"stage 1 in {run_dir} has not finished (no stage1.json); finish it with 'tailaug train CONFIG "
            "--resume' or 'tailaug run CONFIG' and the same config"
        )
    if done != stage1_key(cfg):
        raise other_model_error(f"stage 1 in {run_dir}", run_dir, cfg)
    device = resolve_device(cfg.run.device)
    dtype = resolve_precision(cfg.train.precision, device)
    ckpt = check_checkpoint(run_dir, cfg, device=device)
    data = build_data(cfg.data)
    model = build_network(cfg, data, device, initial_weights=False)
    load_state(model, ckpt["model"], checkpoint_path(run_dir), checkpoint_fix(run_dir))
    return Stage1Model(cfg, data, model.eval(), batch_transform(cfg, data, model), device, dtype)
