"""Stage 1: representation learning (backbone + classifier) on the long-tailed set."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..augment.base import AugmentContext, build_augmenter, sizes_only
from ..augment.meta import MetaStep, meta_indices, rng_snapshot, trainable
from ..augment.mixup import mixed_loss, mixup
from ..augment.remix import Remix
from ..augment.stg import head_classes
from ..config import Config
from ..data.classes import SHOT_GROUPS, shot_groups
from ..data.datasets import LTData, build_data
from ..data.loaders import Batches, GivenBatches
from ..data.natural import check_gpu_decode
from ..data.samplers import build_sampler
from ..engine import distributed
from ..engine.checkpoint import load_state, save_checkpoint
from ..engine.device import autocast, precision_name, resolve_device, resolve_precision
from ..engine.inference import collect_outputs
from ..engine.logging import MetricsLogger
from ..engine.schedule import lr_at
from ..engine.seed import seed_everything, set_stream_state, stream_state, torch_generator
from ..errors import CheckpointError, ConfigError, TailaugError
from ..evaluation.metrics import group_accuracies
from ..evaluation.report import format_table, write_json
from ..evaluation.results import STAGE1, record_results, result_row
from ..evaluation.scoring import eval_settings, score
from ..losses import LossInputs, build_loss
from ..models import Network
from ..models.stage_modules import TrainingNetwork, build_stage_module
from .keys import stage1_key
from .stage1_model import (batch_transform, build_network, checkpoint_fix, checkpoint_path, config_path, marker_path,
                           mid_epoch_fix, mid_epoch_path, resume_checkpoint, write_classes, write_run_config)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, progress: bool = True, data: LTData | None = None):
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), progress
        self.dist = distributed.init_distributed(cfg.run.device)
        self.device = resolve_device(cfg.run.device, self.dist.local_rank)
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        check_gpu_decode(cfg.data.gpu_decode, self.device)  # before the data is read
        seed_everything(cfg.run.seed)
        self.data = data or build_data(cfg.data)
        if self.dist.is_main:
            for note in self.data.notes:
                print(f"data: {note}")
        tc = cfg.train
        if tc.batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size {tc.batch_size} is the global batch and must divide by the "
                f"{self.dist.world_size} processes"
            )
        self.model: Network = build_network(cfg, self.data, self.device)
        self.loss_fn = build_loss(tc, self.data.class_counts).to(self.device)
        self.remix = None  # Remix's label weights on mixup's images (augment/remix.py)
        if tc.remix is not None:
            self.remix = Remix(self.data.class_counts, tc.remix.kappa, tc.remix.tau).to(self.device)
        if self.loss_fn.needs_two_views and tc.mixup_alpha > 0:
            raise ConfigError("supcon needs two views of each image and cannot be combined with mixup; "
                              "set train.mixup_alpha=0 or drop the supcon term")
        if self.loss_fn.needs_cosine and cfg.model.head != "cosine":
            names = sorted({t.name for t in self.loss_fn.terms if t.needs_cosine})
            raise ConfigError(f"the margin loss(es) {', '.join(names)} in train.loss act on the cosines of a "
                              "cosine classifier; set model.head: cosine")
        # train.stage_module: inside the network while training only; self.model stays the plain network
        self.stage_module, train_net = None, self.model
        if tc.stage_module is not None:
            self.stage_module = build_stage_module(tc.stage_module, self.model, self.data.class_counts,
                                                   cfg.model.arch).to(self.device)
            train_net = TrainingNetwork(self.model, self.stage_module)
        self.train_net = train_net
        self.optimizer = torch.optim.SGD(
            [p for p in train_net.parameters() if p.requires_grad], lr=tc.lr, momentum=tc.momentum,
            weight_decay=tc.weight_decay, nesterov=tc.nesterov,
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.transform = batch_transform(cfg, self.data, self.model)
        sampler = build_sampler(tc.sampler, self.data.train.labels, self.data.num_classes,
                                seed=cfg.run.seed, total_epochs=tc.epochs,
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self.train_batches = Batches(
            self.data.train, tc.batch_size // self.dist.world_size, self.transform, self.device,
            order=sampler, augment=True, seed=cfg.run.seed, rank=self.dist.rank,
            num_workers=cfg.data.num_workers, drop_last=True, prefetch_factor=cfg.data.prefetch_factor,
        )
        if len(self.train_batches) == 0:
            raise ConfigError(f"the training set ({len(self.data.train)} images) is smaller than one batch; "
                              "lower train.batch_size")
        # a feature augmenter of the backbone's features (train.feature_augmenter), fitted in fit()
        self.feature_aug = None
        if tc.feature_augmenter.name != "none":
            self.feature_aug = build_augmenter(tc.feature_augmenter).to(self.device)
        # the meta batches of image files (meta_step), decoded ahead by loader workers in step with training
        val = self.data.val
        self.meta_loader = self.meta_feed = None
        if self.feature_aug is not None and val is not None and val.images is None:
            self.meta_loader = GivenBatches(val, self.device, num_workers=cfg.data.num_workers,
                                            prefetch_factor=cfg.data.prefetch_factor)
        self.best: dict | None = None  # the best validation epoch so far (a mid-epoch checkpoint keeps it)
        self.resume_at: dict | None = None  # where restore() found a mid-epoch checkpoint (train_epoch continues it)
        self.net = train_net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a stage module may leave parameters unused in a step (before it generates, or without rare samples)
            self.net = DistributedDataParallel(train_net, device_ids=ids,
                                               find_unused_parameters=self.stage_module is not None)

    # ------------------------------------------------------------------ checkpoints

    def state(self, epoch: int, best: dict | None) -> dict:
        return {
            "epoch": epoch, "key": stage1_key(self.cfg), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "best": best,
            "feature_augmenter": None if self.feature_aug is None else self.feature_aug.state_tensors(),
            "stage_module": None if self.stage_module is None else self.stage_module.state_dict(),
        }

    def restore(self) -> tuple[int, dict | None]:
        """Load the checkpoint to continue from (:func:`resume_checkpoint`); the epoch to start.
        A mid-epoch checkpoint also sets :attr:`resume_at`, which :meth:`train_epoch` continues."""
        path, ckpt = resume_checkpoint(self.run_dir, self.cfg)
        mid = path == mid_epoch_path(self.run_dir)
        fix = mid_epoch_fix(self.run_dir) if mid else checkpoint_fix(self.run_dir)
        for target, entry in ((self.model, "model"), (self.optimizer, "optimizer"), (self.scaler, "scaler")):
            load_state(target, ckpt[entry], path, fix)
        if self.stage_module is not None:
            load_state(self.stage_module, ckpt.get("stage_module") or {}, path, fix)
        self.fit_feature_augmenter(ckpt.get("feature_augmenter"))
        if not mid:
            return ckpt["epoch"] + 1, ckpt["best"]
        if ckpt["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path} was written in epoch {ckpt['epoch'] + 1} by {ckpt['world_size']} "
                                  f"process(es), and this run has {self.dist.world_size}: resume with "
                                  f"{ckpt['world_size']}, or {fix}")
        rank = self.dist.rank
        self.resume_at = {"epoch": ckpt["epoch"], "step": ckpt["step"], "elapsed": ckpt["elapsed"],
                          "streams": ckpt["streams"][rank], "totals": ckpt["totals"][rank],
                          "feature_augmenter": ckpt.get("feature_augmenter"), "path": path, "fix": fix}
        return ckpt["epoch"], ckpt["best"]

    def fit_feature_augmenter(self, state: dict | None = None) -> None:
        """Fit train.feature_augmenter on the current network's features of the training and
        validation images (or on placeholders of their sizes when its options say that its
        stage-1 fit does not read them); a resumed run then restores its checkpointed state."""
        if self.feature_aug is None:
            return
        splits = [self.data.train] + ([self.data.val] if self.data.val is not None else [])
        if self.cfg.train.feature_augmenter.stage1_fit_reads_features:
            outs = [self.outputs(split) for split in splits]
            rows = [(out["features"].to(self.device), out["labels"].to(self.device)) for out in outs]
        else:  # no forward pass over the data: the sizes and the labels
            rows = [(sizes_only(len(split), self.model.feature_dim, self.device),
                     torch.as_tensor(split.labels, device=self.device)) for split in splits]
        counts = self.data.class_counts
        self.feature_aug.fit(AugmentContext(
            features=rows[0][0], labels=rows[0][1],
            class_counts=torch.tensor(counts), num_classes=self.data.num_classes,
            head_classes=head_classes(counts, self.cfg.stg.head, many=self.cfg.data.shots.many),
            validation=rows[1] if len(rows) > 1 else None, online=True,
        ))
        if state:
            self.feature_aug.load_state_tensors(state)

    # ------------------------------------------------------------------ training

    def fit(self, resume: bool = False) -> dict:
        """Train from epoch 0 or the last checkpoint (an epoch's end or a mid-epoch one). Nothing
        is written before the first epoch of this call has finished (then config.yaml, metrics and
        checkpoints), or before its first mid-epoch checkpoint (config.yaml, classes.json and it)."""
        tc, main = self.cfg.train, self.dist.is_main
        if resume:
            start, best = self.restore()
        else:
            start, best = 0, None
            self.fit_feature_augmenter()
        logger = None
        try:
            for epoch in range(start, tc.epochs):
                self.best = best
                record = self.train_epoch(epoch)
                new_best, validation = False, None
                if self.data.val is not None:
                    out = self.outputs(self.data.val)
                    val = score(out["logits"], self.data.val.labels, self.data.class_counts, self.cfg)
                    record.update({"val_top1": val["top1"], **{f"val_{g}": val[g] for g in SHOT_GROUPS},
                                   "val_per_class": val["per_class"]})
                    validation = (out["features"], out["labels"])
                    if best is None or val["top1"] > best["val_top1"]:
                        best, new_best = {"epoch": epoch, "val_top1": val["top1"]}, True
                if self.feature_aug is not None:  # with or without a validation split (ISDA logs its lambda)
                    record.update(self.feature_aug.after_epoch(self.model.head, epoch, validation=validation))
                if main:
                    if logger is None:
                        write_run_config(self.cfg, self.run_dir)
                        write_classes(self.data, self.run_dir)
                        logger = MetricsLogger(self.run_dir, resume_epoch=start if resume else None)
                    if new_best:
                        save_checkpoint(self.run_dir / "checkpoints" / "best.pt", self.state(epoch, best))
                    logger.log(record, step=epoch)
                    save_checkpoint(checkpoint_path(self.run_dir), self.state(epoch, best))
                    mid_epoch_path(self.run_dir).unlink(missing_ok=True)  # last.pt is further on
                distributed.barrier()
            if main and resume and logger is None:  # nothing left to train: still mend the metrics
                logger = MetricsLogger(self.run_dir, resume_epoch=start)
        finally:
            if logger is not None:
                logger.close()
        return self.finish()

    def train_epoch(self, epoch: int) -> dict:
        """One epoch (from the step of :attr:`resume_at` when it holds this epoch); its record.

        Every random draw of a step comes from three streams seeded by (seed, epoch, rank): the
        crop/flip generator, ``rng`` (mixup, Remix) and ``aug_gen`` (the feature augmenter). With
        ``train.checkpoint_every_steps`` they are saved with the running sums, so a run resumed
        from the mid-epoch checkpoint makes the draws and logs the metrics of an uninterrupted one."""
        tc = self.cfg.train
        resume, self.resume_at = self.resume_at, None
        if resume is not None and resume["epoch"] != epoch:
            resume = None
        self.net.train()
        self.train_batches.set_epoch(epoch)
        self.loss_fn.set_epoch(epoch)
        if self.feature_aug is not None:
            self.feature_aug.set_epoch(epoch, tc.epochs)
            if resume is not None and resume["feature_augmenter"]:  # with the sums of the epoch so far
                self.feature_aug.load_state_tensors(resume["feature_augmenter"])
        if self.stage_module is not None:
            self.stage_module.set_epoch(epoch)
        rng = np.random.default_rng([self.cfg.run.seed, epoch, self.dist.rank])
        steps = len(self.train_batches)
        # loss sum, correct, seen: kept on the device (no host sync per step; NCCL reduces CUDA tensors only)
        # then correct and seen per class (views of totals: one all-reduce per epoch)
        num_classes = self.data.num_classes
        totals = torch.zeros(3 + 2 * num_classes, dtype=torch.float64, device=self.device)
        by_class = totals[3:].view(2, num_classes)
        gen = self.train_batches.generator()
        aug_gen = torch_generator(self.cfg.run.seed, epoch, self.dist.rank, 23, device=self.device)
        streams = [g for g in (gen, aug_gen) if g is not None]
        first, before = 0, 0.0  # steps done and seconds spent in this epoch before this call
        if resume is not None:
            first, before = resume["step"], resume["elapsed"]
            try:
                set_stream_state(resume["streams"], streams, rng)
            except ValueError:
                raise CheckpointError(f"the random streams in {resume['path']} were saved on another kind of "
                                      f"device than {self.device.type}: resume on that device, or "
                                      f"{resume['fix']}") from None
            totals.copy_(resume["totals"])
        self.meta_feed = self.meta_batches(epoch, first, steps)
        every = tc.checkpoint_every_steps
        t0 = time.perf_counter()
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
                   disable=not (self.show_progress and self.dist.is_main), dynamic_ncols=True)
        for step, (raw, y, _) in enumerate(self.train_batches.raw(first), start=first):
            lr = lr_at(tc, epoch, step, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = self.transform(raw, gen)
            if self.loss_fn.needs_two_views:
                x, y = torch.cat([x, self.transform(raw, gen)]), torch.cat([y, y])
            loss, logits = self.step(x, y, rng, aug_gen, at=(epoch, step))
            hits = logits.argmax(1) == y
            totals[0] += loss * len(y)
            totals[1] += hits.sum()
            totals[2] += len(y)
            by_class[0].index_add_(0, y, hits.to(torch.float64))
            by_class[1].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            bar.update()
            if step % 10 == 0 or step == steps - 1:  # the only host reads of the epoch (but checkpoints)
                loss_sum, _, seen = totals[:3].tolist()
                check_finite(loss_sum, loss, epoch, step)
                ips = seen * self.dist.world_size / (before + time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.4f}", img_s=f"{ips:.0f}")
            if every and (step + 1) % every == 0 and step + 1 < steps:
                self.save_mid_epoch(epoch, step + 1, streams, rng, totals, loss, before + time.perf_counter() - t0)
        bar.close()
        self.meta_feed = None
        distributed.all_reduce_sum(totals)
        loss_sum, correct, seen = totals[:3].tolist()
        elapsed = before + time.perf_counter() - t0
        record = {
            "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen, "lr": lr,
            "images_per_s": seen / elapsed, "epoch_s": elapsed, **self.class_accuracies("train", *by_class.tolist()),
        }
        if self.show_progress and self.dist.is_main:
            tqdm.write(f"epoch {epoch + 1}/{tc.epochs}  loss {record['train_loss']:.4f}  "
                       f"train acc {record['train_acc']:.2f}  lr {lr:.4f}  {record['images_per_s']:.0f} img/s")
        return record

    def save_mid_epoch(self, epoch: int, step: int, streams: list[torch.Generator], rng: np.random.Generator,
                       totals: torch.Tensor, loss: torch.Tensor, elapsed: float) -> None:
        """Write ``checkpoints/mid_epoch.pt`` after ``step`` steps of ``epoch`` (rank 0 writes;
        every rank calls this): :meth:`state` with every process's random streams and running
        sums, gathered on the device (one host sync per checkpoint)."""
        rows = [distributed.all_gather_cat(t[None].to(self.device)).cpu()
                for t in (stream_state(streams, rng), totals)]
        check_finite(float(rows[1][:, 0].sum()), loss, epoch, step - 1)  # never checkpoint a diverged model
        if not self.dist.is_main:
            return
        if not config_path(self.run_dir).is_file():  # the checkpoint's run files, before the first epoch ends
            write_run_config(self.cfg, self.run_dir)
            write_classes(self.data, self.run_dir)
        save_checkpoint(mid_epoch_path(self.run_dir), {
            **self.state(epoch, self.best), "step": step, "world_size": self.dist.world_size,
            "streams": rows[0], "totals": rows[1], "elapsed": elapsed,
        })

    def class_accuracies(self, split: str, correct: list[float], seen: list[float]) -> dict:
        """Shot-group and per-class accuracy (%) from per-class counts of correct and seen
        samples (a class not seen: None), keyed ``<split>_many`` ... ``<split>_per_class``."""
        per_class = np.divide(correct, seen, out=np.full(len(seen), np.nan), where=np.asarray(seen) > 0)
        shots = self.cfg.data.shots
        groups = group_accuracies(per_class, shot_groups(self.data.class_counts, many=shots.many, few=shots.few))
        return {**{f"{split}_{g}": v for g, v in groups.items()},
                f"{split}_per_class": [None if np.isnan(a) else float(100 * a) for a in per_class]}

    def step(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
             aug_gen: torch.Generator | None = None, at: tuple[int, int] = (0, 0)
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the (detached) loss and logits, still on the device.

        With train.feature_augmenter, its virtual rows (drawn before the batch) go through the
        head in the same forward pass; their cross-entropy joins the loss weighted by their
        share of the rows; the loss sees the batch's inputs as the augmenter adjusts them
        (``adjust_loss_inputs``, e.g. an implicit augmentation term), and the augmenter then observes the
        batch's features. An augmenter that asks for a meta step (``meta_rows``) first gets
        :meth:`meta_step` of this step (``at``: epoch, step)."""
        tc = self.cfg.train
        lam, perm = 1.0, None
        if tc.mixup_alpha > 0:
            x, lam, perm = mixup(x, rng, tc.mixup_alpha)
        extra, extra_y = None, None
        if self.feature_aug is not None:
            extra, extra_y = self.feature_aug.virtual(len(y), aug_gen) or (None, None)
            if extra_y is not None and not len(extra_y):
                extra = None
        rows = self.feature_aug.meta_rows() if self.feature_aug is not None else 0
        rng = rng_snapshot(self.device) if rows else None  # the meta step replays this pass's random draws
        with autocast(self.device, self.dtype):
            out = self.net(x, extra, labels=y) if self.stage_module is not None else self.net(x, extra)
        logits, features = out.logits.float(), out.features.float()
        batch = len(y)
        if out.labels is not None:  # rows generated inside the network (train.stage_module) join the batch
            y = torch.cat([y, out.labels])
        virtual_logits, logits = logits[len(y):], logits[: len(y)]
        cosine = self.model.head.cosine(features)  # None for a linear head
        inputs = LossInputs(logits, y, features, cosine)
        if self.feature_aug is not None:  # never with mixup (a config error): one label per feature
            if rows:
                self.feature_aug.set_meta_step(self.meta_step(rows, *at, batch=x, features=out.features, rng=rng))
            inputs = self.feature_aug.adjust_loss_inputs(inputs, self.model.head)
        if perm is None:
            loss = self.loss_fn(inputs)
        else:  # mixup, or Remix's per-sample label weights
            label_weight = None if self.remix is None else self.remix(lam, y, y[perm])
            loss = mixed_loss(self.loss_fn, inputs, y[perm], lam, label_weight)
        if extra is not None:
            virtual_loss = torch.nn.functional.cross_entropy(virtual_logits, extra_y)
            loss = (len(y) * loss + len(extra_y) * virtual_loss) / (len(y) + len(extra_y))
        if out.loss is not None:  # a stage module's own loss terms
            loss = loss + out.loss
        if self.feature_aug is not None:
            self.feature_aug.observe(features, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.train_net.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits[:batch].detach()

    def meta_batches(self, epoch: int, first: int, steps: int) -> Iterator | None:
        """For image files, when the feature augmenter takes meta steps in ``epoch`` (its
        ``meta_rows``, the same on every step of an epoch): (step, (images, labels)) of the
        epoch's steps from ``first`` (a resumed epoch's) to ``steps``, the meta indices of each
        drawn as :meth:`meta_step` draws them and the images decoded ahead by the workers of
        :attr:`meta_loader`; else None."""
        rows = self.feature_aug.meta_rows() if self.feature_aug is not None else 0
        if not rows or self.meta_loader is None:
            return None
        size, seed = len(self.data.val), self.cfg.run.seed
        loaded = self.meta_loader.raw(meta_indices(size, rows, seed, epoch, s) for s in range(first, steps))
        return zip(range(first, steps), loaded)

    def meta_step(self, rows: int, epoch: int, step: int, *, batch=None, features=None, rng=None) -> MetaStep:
        """This step's :class:`MetaStep`: the network (not a copy), its trainable parameters, the
        loss, the lr, and ``rows`` validation images (evaluation transform) drawn by (seed, epoch, step):
        rows of the in-memory images, or for image files the batch of :attr:`meta_feed`; ``batch``,
        ``features``, ``rng``: the step's training images, their features in its forward pass and
        the generators' states before that pass."""
        val = self.data.val
        if val.images is not None:
            idx = meta_indices(len(val), rows, self.cfg.run.seed, epoch, step)
            raw, labels = val.images[idx].to(self.device), torch.from_numpy(val.labels)[idx].to(self.device)
        else:
            fed = None if self.meta_feed is None else next(self.meta_feed, None)
            if fed is None or fed[0] != step:
                raise TailaugError(f"no meta batch of image files was decoded for step {step + 1} of epoch "
                                   f"{epoch + 1}: train_epoch decodes one for every step of an epoch in which "
                                   "the feature augmenter's meta_rows is positive")
            raw, labels = fed[1]
        return MetaStep(module=self.model, params=trainable(self.model), loss=self.loss_fn,
                        lr=self.optimizer.param_groups[0]["lr"], meta_images=self.transform(raw),
                        meta_labels=labels,
                        logits_of=lambda out: out.logits, autocast=lambda: autocast(self.device, self.dtype),
                        head_prefix="head.", batch=batch, features=features, rng=rng)

    # ------------------------------------------------------------------ evaluation

    def batches(self, split, order=None) -> Batches:
        return Batches(split, self.cfg.train.eval_batch_size, self.transform, self.device, order=order,
                       num_workers=self.cfg.data.num_workers, prefetch_factor=self.cfg.data.prefetch_factor)

    def outputs(self, split) -> dict[str, torch.Tensor]:
        """Features, logits, labels and indices of ``split`` in its order (on the CPU).

        Under DDP every rank runs rank 0's model (:func:`distributed.broadcast_buffers`) on its own
        block of the split (:func:`distributed.shard`) and the blocks are gathered on the device;
        every rank calls this and gets all rows.
        """
        if not self.dist.enabled:
            return collect_outputs(self.model, self.batches(split), self.device, self.dtype)
        distributed.broadcast_buffers(self.model)
        order = distributed.shard(len(split), self.dist.rank, self.dist.world_size)
        local = collect_outputs(self.model, self.batches(split, order), self.device, self.dtype)
        return {k: distributed.all_gather_cat(v.to(self.device))[: len(split)].cpu() for k, v in local.items()}

    def evaluate(self, split) -> dict:
        return score(self.outputs(split)["logits"], split.labels, self.data.class_counts, self.cfg)

    def finish(self) -> dict:
        """Evaluate the last epoch on the test set; write its row of results.json, then stage1.json.

        Every rank takes part in the (sharded) evaluation; the main process writes."""
        logits = self.outputs(self.data.test)["logits"]
        plots = self.run_dir / "plots" if self.dist.is_main else None
        results = score(logits, self.data.test.labels, self.data.class_counts, self.cfg, plots_dir=plots, name=STAGE1)
        if self.dist.is_main:
            record_results(self.run_dir, {STAGE1: stage1_row(self.cfg, results, precision=precision_name(self.dtype))})
            write_json(marker_path(self.run_dir), {"key": stage1_key(self.cfg), "epochs": self.cfg.train.epochs})
            print(format_table([("stage 1 (last epoch)", results)]))
        distributed.barrier()
        return results


def check_finite(loss_sum: float, loss: torch.Tensor, epoch: int, step: int) -> None:
    """Raise when the running loss sum of an epoch is no longer finite (``step``: 0-based)."""
    if not math.isfinite(loss_sum):
        raise TailaugError(
            f"the training loss became {loss.item()} (not finite) by step {step + 1} of epoch "
            f"{epoch + 1}; lower train.lr, enable train.grad_clip, or use train.precision=fp32; "
            "the last good checkpoint is kept"
        )


def stage1_row(cfg: Config, metrics: dict, **choices) -> dict:
    """The results.json row of the last-epoch stage-1 model scored on the test set; ``choices``
    adds what was resolved at run time (the precision it ran in, the feature cache, ...)."""
    return result_row(metrics, key=stage1_key(cfg), settings=eval_settings(cfg),
                      choices={"epoch": cfg.train.epochs - 1, **choices})


def train_stage1(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, run_dir, progress=progress).fit(resume=resume)
