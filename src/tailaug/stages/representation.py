"""Stage 1: representation learning (backbone + classifier) on the long-tailed set."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..augment.mixup import mixup
from ..config import Config
from ..data.datasets import LTData, build_data
from ..data.loaders import Batches
from ..data.samplers import build_sampler
from ..data.transforms import BatchTransform
from ..engine import distributed
from ..engine.checkpoint import load_checkpoint, load_state, save_checkpoint
from ..engine.device import autocast, resolve_device, resolve_precision
from ..engine.inference import collect_outputs
from ..engine.logging import MetricsLogger
from ..engine.schedule import lr_at
from ..engine.seed import seed_everything
from ..errors import CheckpointError, ConfigError, TailaugError
from ..evaluation.metrics import evaluate_logits
from ..evaluation.plots import plot_results
from ..evaluation.report import format_table, read_json, write_json
from ..losses import LossInputs, adjust_logits, build_loss
from ..models import Network, build_model

STAGE1_SECTIONS = ("run.seed", "data", "model", "train")


def stage1_key(cfg: Config) -> str:
    return cfg.section_hash(*STAGE1_SECTIONS)


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def is_complete(run_dir: Path, cfg: Config) -> bool:
    """True when ``run_dir`` holds a finished stage 1 trained with this config."""
    done = Path(run_dir) / "stage1.json"
    fix = ("delete it and rerun 'tailaug run' or 'tailaug train --resume': stage 1 is then finished "
           "again from checkpoints/last.pt without training")
    return done.is_file() and read_json(done, fix=fix, keys=("key",))["key"] == stage1_key(cfg)


CHECKPOINT_ENTRIES = ("epoch", "key", "model", "optimizer", "scaler", "best")  # what Trainer.state saves


def _checkpoint_fix(run_dir: Path) -> str:
    return ("tailaug keeps only the last epoch's checkpoint, so there is no earlier one to resume or "
            f"evaluate from: train stage 1 again under another run.name, or delete {run_dir} and rerun")


def load_stage1_checkpoint(run_dir: Path, device: str | torch.device = "cpu") -> dict:
    """checkpoints/last.pt of ``run_dir`` holding every entry of :meth:`Trainer.state`; a
    CheckpointError that says what to do when it is unreadable or holds something else."""
    path, fix = checkpoint_path(run_dir), _checkpoint_fix(run_dir)
    ckpt = load_checkpoint(path, device, fix=fix)
    missing = [k for k in CHECKPOINT_ENTRIES if k not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_ENTRIES
    if missing or not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["model"], dict):
        what = f"without {', '.join(missing)}" if missing else "with a malformed epoch or model entry"
        raise CheckpointError(f"checkpoint {path} is not a tailaug stage-1 checkpoint (a {type(ckpt).__name__} "
                              f"{what}); {fix}")
    return ckpt


def load_stage1_model(model: torch.nn.Module, run_dir: Path, device: str | torch.device = "cpu") -> dict:
    """Load the weights of ``run_dir``'s stage-1 checkpoint into ``model``; returns the checkpoint."""
    ckpt = load_stage1_checkpoint(run_dir, device)
    load_state(model, ckpt["model"], checkpoint_path(run_dir), _checkpoint_fix(run_dir))
    return ckpt


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, progress: bool = True, data: LTData | None = None):
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), progress
        self.dist = distributed.init_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.dist.local_rank)
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        seed_everything(cfg.run.seed)
        self.data = data or build_data(cfg.data)
        tc = cfg.train
        if tc.batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size {tc.batch_size} is the global batch and must divide by the "
                f"{self.dist.world_size} processes"
            )
        self.model: Network = build_model(cfg.model, self.data.num_classes, self.data.in_channels).to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(tc, self.data.class_counts).to(self.device)
        if self.loss_fn.needs_two_views and tc.mixup_alpha > 0:
            raise ConfigError("supcon needs two views of each image and cannot be combined with mixup; "
                              "set train.mixup_alpha=0 or drop the supcon term")
        if self.loss_fn.needs_cosine and cfg.model.head != "cosine":
            raise ConfigError("margin losses (arcface, cosface, sphereface) need model.head: cosine")
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=tc.lr, momentum=tc.momentum,
            weight_decay=tc.weight_decay, nesterov=tc.nesterov,
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.transform = BatchTransform(self.data.mean, self.data.std, cfg.data.crop_padding,
                                        cfg.data.flip, tc.channels_last)
        sampler = build_sampler(tc.sampler, self.data.train.labels, self.data.num_classes,
                                seed=cfg.run.seed, total_epochs=tc.epochs,
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self.train_batches = Batches(
            self.data.train, tc.batch_size // self.dist.world_size, self.transform, self.device,
            order=sampler, augment=True, seed=cfg.run.seed, rank=self.dist.rank,
            num_workers=cfg.data.num_workers, drop_last=True,
        )
        if len(self.train_batches) == 0:
            raise ConfigError(f"the training set ({len(self.data.train)} images) is smaller than one batch; "
                              "lower train.batch_size")
        self.net = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    # ------------------------------------------------------------------ checkpoints

    def state(self, epoch: int, best: dict | None) -> dict:
        return {
            "epoch": epoch, "key": stage1_key(self.cfg), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "best": best,
        }

    def restore(self) -> tuple[int, dict | None]:
        path = checkpoint_path(self.run_dir)
        ckpt = load_stage1_checkpoint(self.run_dir, self.device)
        if ckpt["key"] != stage1_key(self.cfg):
            raise TailaugError(
                f"{path} was written with a different data/model/train config; "
                "resume with the config saved in the run directory, or start a new run.name"
            )
        for target, entry in ((self.model, "model"), (self.optimizer, "optimizer"), (self.scaler, "scaler")):
            load_state(target, ckpt[entry], path, _checkpoint_fix(self.run_dir))
        return ckpt["epoch"] + 1, ckpt["best"]

    # ------------------------------------------------------------------ training

    def fit(self, resume: bool = False) -> dict:
        tc, main = self.cfg.train, self.dist.is_main
        start, best = self.restore() if resume else (0, None)
        logger = MetricsLogger(self.run_dir, enabled=main, resume_epoch=start if resume else None)
        try:
            for epoch in range(start, tc.epochs):
                record = self.train_epoch(epoch)
                if self.data.val is not None:
                    val = self.evaluate(self.data.val)
                    record.update({"val_top1": val["top1"], "val_few": val["few"]})
                    if best is None or val["top1"] > best["val_top1"]:
                        best = {"epoch": epoch, "val_top1": val["top1"]}
                        if main:
                            save_checkpoint(self.run_dir / "checkpoints" / "best.pt", self.state(epoch, best))
                if main:
                    logger.log(record, step=epoch)
                    save_checkpoint(checkpoint_path(self.run_dir), self.state(epoch, best))
                distributed.barrier()
        finally:
            logger.close()
        return self.finish()

    def train_epoch(self, epoch: int) -> dict:
        tc = self.cfg.train
        self.net.train()
        self.train_batches.set_epoch(epoch)
        self.loss_fn.set_epoch(epoch)
        rng = np.random.default_rng([self.cfg.run.seed, epoch, self.dist.rank])
        steps = len(self.train_batches)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
                   disable=not (self.show_progress and self.dist.is_main), dynamic_ncols=True)
        gen = self.train_batches.generator()
        for step, (raw, y, _) in enumerate(self.train_batches.raw()):
            lr = lr_at(tc, epoch, step, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = self.transform(raw, gen)
            if self.loss_fn.needs_two_views:
                x, y = torch.cat([x, self.transform(raw, gen)]), torch.cat([y, y])
            loss, logits = self.step(x, y, rng)
            totals += torch.tensor([loss * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                                   dtype=torch.float64)
            bar.update()
            if step % 10 == 0 or step == steps - 1:
                ips = totals[2].item() * self.dist.world_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", lr=f"{lr:.4f}", img_s=f"{ips:.0f}")
        bar.close()
        distributed.all_reduce_sum(totals)
        elapsed = time.perf_counter() - t0
        record = {
            "epoch": epoch, "train_loss": totals[0].item() / totals[2].item(),
            "train_acc": 100 * totals[1].item() / totals[2].item(), "lr": lr,
            "images_per_s": totals[2].item() / elapsed, "epoch_s": elapsed,
        }
        if self.show_progress and self.dist.is_main:
            tqdm.write(f"epoch {epoch + 1}/{tc.epochs}  loss {record['train_loss']:.4f}  "
                       f"train acc {record['train_acc']:.2f}  lr {lr:.4f}  {record['images_per_s']:.0f} img/s")
        return record

    def step(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
        tc = self.cfg.train
        lam, perm = 1.0, None
        if tc.mixup_alpha > 0:
            x, lam, perm = mixup(x, rng, tc.mixup_alpha)
        with autocast(self.device, self.dtype):
            out = self.net(x)
        logits, features = out.logits.float(), out.features.float()
        cosine = self.model.head.cosine(features)  # None for a linear head
        loss = self.loss_fn(LossInputs(logits, y, features, cosine))
        if perm is not None:
            loss = lam * loss + (1 - lam) * self.loss_fn(LossInputs(logits, y[perm], features, cosine))
        if not torch.isfinite(loss):
            raise TailaugError(
                f"the training loss became {loss.item()} (not finite); lower train.lr, enable "
                "train.grad_clip, or use train.precision=fp32; the last good checkpoint is kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item(), logits.detach()

    # ------------------------------------------------------------------ evaluation

    def batches(self, split) -> Batches:
        return Batches(split, self.cfg.train.eval_batch_size, self.transform, self.device,
                       num_workers=self.cfg.data.num_workers)

    def outputs(self, split) -> dict[str, torch.Tensor]:
        return collect_outputs(self.model, self.batches(split), self.device, self.dtype)

    def evaluate(self, split) -> dict:
        return score(self.outputs(split)["logits"], split.labels, self.data.class_counts, self.cfg)

    def report(self, split) -> dict:
        """Test metrics plus per-class and reliability plots in run_dir/plots."""
        logits = self.outputs(split)["logits"]
        results = score(logits, split.labels, self.data.class_counts, self.cfg)
        shots = self.cfg.data.shots
        plot_results(logits, split.labels, self.data.class_counts, results, self.run_dir / "plots", "stage 1",
                     many=shots.many, few=shots.few, bins=self.cfg.eval.ece_bins)
        return results

    def finish(self) -> dict:
        """Evaluate the last epoch on the test set, write results.json and stage1.json."""
        results = {}
        if self.dist.is_main:
            results = self.report(self.data.test)
            results["epoch"] = self.cfg.train.epochs - 1
            write_json(self.run_dir / "results.json", {"stage1": results})
            write_json(self.run_dir / "stage1.json", {"key": stage1_key(self.cfg), "epochs": self.cfg.train.epochs})
            print(format_table([("stage 1 (last epoch)", results)]))
        distributed.barrier()
        return results


def score(logits: torch.Tensor, labels, class_counts, cfg: Config) -> dict:
    """Metrics of logits on a split (with post-hoc logit adjustment when configured)."""
    if cfg.eval.logit_adjust_tau > 0:
        logits = adjust_logits(logits, class_counts, cfg.eval.logit_adjust_tau)
    shots = cfg.data.shots
    return evaluate_logits(logits, torch.as_tensor(labels), class_counts, many=shots.many,
                           few=shots.few, ece_bins=cfg.eval.ece_bins)


def train_stage1(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, run_dir, progress=progress).fit(resume=resume)
