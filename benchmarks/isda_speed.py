"""ISDA's statistics update and loss, and a MetaSAug step, against naive implementations.

1. ISDA (``tailaug.augment.isda``, ``class_moments``): one batch's statistics update plus
   the augmented cross-entropy and its backward pass (to the features and the classifier),
   batch 128, at 100 classes x 64 features (full covariance) and at 1,000 classes x 2,048
   features (diagonal, and low-rank of rank 8), against a naive implementation written here
   that expands batch x classes x features as the published ISDA code does (its full
   estimator, and the same expansion with per-dimension variances for the diagonal case,
   which serves as the naive reference of the low-rank form too). Goal: >= 10x faster at
   100 x 64; bounded memory at 1,000 x 2,048 where the naive one needs gigabytes.
2. MetaSAug (``tailaug.augment.metasaug``): one training step of a ResNet-32 on 32x32x3
   images, batch 128, 100 classes, meta batch 100: plain cross-entropy, ISDA, MetaSAug (the
   virtual step of all parameters a ``torch.func.functional_call`` of the same network, the
   Sigma-gradient by one forward-mode pass instead of a second-order one), MetaSAug
   with ``meta_params: head`` (the classifier alone takes the virtual step), and a naive MetaSAug
   step that deep-copies the model every step and swaps the updated tensors into the copy.
   Goal: a MetaSAug step at most 3x a plain step.

Time: the median of ``--steps`` timed steps after one warm-up step. Memory: each case runs in
a fresh process (multiprocessing, spawn); on the CPU its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the one measured after building the
inputs and the model, i.e. the peak of what the timed steps allocate beyond them; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the steps. The analytic size
of the naive code's largest batch x classes x features tensor is printed beside it.

    .venv/bin/python benchmarks/isda_speed.py [--steps 5] [--threads 2] [--device cpu]
    .venv/bin/python benchmarks/isda_speed.py --quick    # tiny sizes: a smoke run of a few seconds

Writes benchmarks/results/isda_speed.{json,md} (``--quick``: isda_speed_quick.{json,md}).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MIB = 2**20


# --------------------------------------------------------------------------- naive ISDA (the published expansion)


class NaiveISDA:
    """The published estimator's algorithm: every batch expanded to [N, C, A] (and the full
    covariance's batch term formed by a [C, A, N] x [C, N, A] product); the loss's term by
    [N, C, A] differences and, for the full covariance, [N, C, C] products."""

    def __init__(self, classes: int, dim: int, full: bool, device):
        self.full = full
        self.amount = torch.zeros(classes, device=device)
        self.ave = torch.zeros(classes, dim, device=device)
        self.cov = torch.zeros(classes, dim, dim, device=device) if full else torch.zeros(classes, dim, device=device)

    def update(self, features, labels):
        n, a = features.shape
        c = self.ave.shape[0]
        onehot = torch.zeros(n, c, device=features.device).scatter_(1, labels[:, None], 1)
        mask = onehot[:, :, None].expand(n, c, a)
        by_class = features[:, None, :].expand(n, c, a) * mask  # [N, C, A]
        count = mask.sum(0).clamp_min(1)  # [C, A]
        ave = by_class.sum(0) / count
        centred = by_class - ave[None] * mask  # [N, C, A]
        if self.full:
            var = torch.bmm(centred.permute(1, 2, 0), centred.permute(1, 0, 2)) / count[:, :, None]  # [C, A, A]
        else:
            var = centred.square().sum(0) / count
        seen = onehot.sum(0)
        w = seen / (seen + self.amount).clamp_min(1)
        gap = self.ave - ave
        if self.full:
            w3 = w[:, None, None]
            self.cov = self.cov * (1 - w3) + var * w3 + w3 * (1 - w3) * gap[:, :, None] * gap[:, None, :]
        else:
            w2 = w[:, None]
            self.cov = self.cov * (1 - w2) + var * w2 + w2 * (1 - w2) * gap.square()
        self.ave = self.ave * (1 - w[:, None]) + ave * w[:, None]
        self.amount = self.amount + seen

    def logits(self, logits, weight, labels, lam):
        n, (c, a) = labels.numel(), weight.shape
        w_all = weight[None].expand(n, c, a)
        diff = w_all - torch.gather(w_all, 1, labels[:, None, None].expand(n, c, a))  # [N, C, A]
        if self.full:
            sigma2 = torch.bmm(torch.bmm(diff, self.cov[labels]), diff.permute(0, 2, 1))  # [N, C, C]
            sigma2 = torch.diagonal(sigma2, dim1=1, dim2=2)
        else:
            sigma2 = (diff.square() * self.cov[labels][:, None, :]).sum(2)
        return logits + 0.5 * lam * sigma2


# --------------------------------------------------------------------------- one measured case (in its own process)


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(step, steps: int, device) -> dict:
    """Median ms of ``steps`` calls after one warm-up, and the peak memory they add."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_bytes(device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(1000 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "peak_mib": max(0, _peak_bytes(device) - base) / MIB}


def isda_case(impl: str, kind: str, classes: int, dim: int, batch: int, steps: int, device: str, threads: int) -> dict:
    from tailaug.augment.class_moments import ClassMoments
    from tailaug.augment.isda import implicit_shift

    torch.set_num_threads(threads)
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    stream = [(torch.randn(batch, dim, generator=g).to(device),
               torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(steps + 1)]
    weight = (torch.randn(classes, dim, generator=g) / dim**0.5).to(device).requires_grad_()
    lam, it = 0.5, iter(stream)
    if impl == "naive":
        naive = NaiveISDA(classes, dim, kind == "full", device)

        def step():
            x, y = next(it)
            x = x.requires_grad_()
            naive.update(x.detach(), y)
            loss = F.cross_entropy(naive.logits(x @ weight.t(), weight, y, lam), y)
            loss.backward()
    else:
        moments = ClassMoments(kind, 8 if kind == "lowrank" else None)
        moments.reset(classes, dim, device)

        def step():
            x, y = next(it)
            x = x.requires_grad_()
            cls, slot = moments.update(x.detach(), y)
            shift = implicit_shift(weight, y, cls, slot, moments.covariance(cls), lam)
            loss = F.cross_entropy(x @ weight.t() + shift, y)
            loss.backward()

    return _timed(step, steps, device)


def _swap_parameters(module, tensors: dict) -> None:
    """Put ``tensors`` (by parameter name) in place of the module's parameters (the copy-based
    meta step: the updated tensors are functions of Sigma, so they cannot be Parameters)."""
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        del owner._parameters[leaf]
        setattr(owner, leaf, t)


def meta_case(impl: str, size: int, classes: int, batch: int, meta_batch: int, steps: int, arch: str,
              device: str, threads: int) -> dict:
    from tailaug.augment.base import AugmentContext
    from tailaug.augment.class_moments import Covariance
    from tailaug.augment.isda import implicit_shift
    from tailaug.augment.meta import MetaStep, trainable
    from tailaug.augment.metasaug import MetaSAugAugmenter
    from tailaug.config import ModelConfig
    from tailaug.losses import LossInputs
    from tailaug.models import build_model
    from tailaug.models.heads import linear_form

    torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), classes, 3).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    meta_x = torch.randn(meta_batch, 3, size, size, generator=g).to(device)
    meta_y = (torch.arange(meta_batch) % classes).to(device)
    dim = model.feature_dim
    aug = MetaSAugAugmenter(lambda0=0.75, meta_lr=0.1, meta_batch=meta_batch,
                            meta_params="head" if impl == "metasaug_head" else "all")
    aug.fit(AugmentContext(features=torch.zeros(1, dim, device=device), labels=torch.zeros(1, dtype=torch.long),
                           class_counts=[1] * classes, head_classes=[], online=True,
                           validation=(torch.zeros(classes, dim), torch.arange(classes))))
    aug.set_epoch(1, 2)
    ce = lambda i: F.cross_entropy(i.logits, i.targets)  # noqa: E731

    def real_step(adjust):
        out = model(x)
        inputs = LossInputs(out.logits.float(), y, out.features.float())
        loss = ce(adjust(inputs, out.features))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def metasaug_adjust(inputs, features):
        aug.set_meta_step(MetaStep(module=model, params=trainable(model), loss=ce, lr=0.1, meta_images=meta_x,
                                   meta_labels=meta_y, logits_of=lambda o: o.logits, head_prefix="head.",
                                   batch=x, features=features))
        return aug.adjust_loss_inputs(inputs, model.head)

    def naive_adjust(inputs, _features):  # the copy-based meta step, then ISDA's term with the refined Sigma
        phi = inputs.features.detach()
        classes_, slot = aug.moments.update(phi, y)
        sigma = aug.moments.covariance(classes_).full.clone().requires_grad_()
        twin = copy.deepcopy(model)
        out = twin(x)
        form = linear_form(twin.head)
        shift = implicit_shift(form.weight, y, classes_, slot, Covariance(full=sigma), aug.lam)
        params = dict(twin.named_parameters())
        grads = torch.autograd.grad(ce(LossInputs(out.logits + shift, y, out.features)), list(params.values()),
                                    create_graph=True)
        _swap_parameters(twin, {n: p - 0.1 * gr for (n, p), gr in zip(params.items(), grads)})
        (found,) = torch.autograd.grad(F.cross_entropy(twin(meta_x).logits, meta_y), sigma)
        refined = Covariance(full=(sigma - 0.1 * found).detach())
        shift = implicit_shift(linear_form(model.head).weight, y, classes_, slot, refined, aug.lam)
        return LossInputs(inputs.logits + shift, y, inputs.features)

    adjust = {"plain": lambda i, _: i, "isda": lambda i, _: aug.adjust_loss_inputs(i, model.head),
              "metasaug": metasaug_adjust, "metasaug_head": metasaug_adjust, "naive_metasaug": naive_adjust}[impl]
    return _timed(lambda: real_step(adjust), steps, device)


def _in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    args = parser.parse_args()
    if args.quick:
        isda_settings = [("full", 10, 16, 32), ("diagonal", 50, 64, 32), ("lowrank", 50, 64, 32)]
        meta = dict(size=16, classes=10, batch=16, meta_batch=10, arch="resnet20")
        steps = 2
    else:
        isda_settings = [("full", 100, 64, 128), ("diagonal", 1000, 2048, 128), ("lowrank", 1000, 2048, 128)]
        meta = dict(size=32, classes=100, batch=128, meta_batch=100, arch="resnet32")
        steps = args.steps
    isda_rows = []
    for kind, classes, dim, batch in isda_settings:
        row = {"covariance": kind, "classes": classes, "features": dim, "batch": batch,
               "naive_largest_tensor_mib": batch * classes * dim * 4 / MIB}
        for impl in ("tailaug", "naive"):
            row[impl] = _in_fresh_process(isda_case, impl, kind, classes, dim, batch, steps, args.device, args.threads)
        row["speedup"] = row["naive"]["ms"] / row["tailaug"]["ms"]
        isda_rows.append(row)
        print(f"isda {kind:<8} C={classes:<5} d={dim:<5} tailaug {row['tailaug']['ms']:9.1f} ms "
              f"{row['tailaug']['peak_mib']:8.1f} MiB | naive {row['naive']['ms']:9.1f} ms "
              f"{row['naive']['peak_mib']:8.1f} MiB (largest [N,C,A] {row['naive_largest_tensor_mib']:.0f} MiB) "
              f"| {row['speedup']:.1f}x")
    meta_rows = {}
    for impl in ("plain", "isda", "metasaug", "metasaug_head", "naive_metasaug"):
        meta_rows[impl] = _in_fresh_process(meta_case, impl, meta["size"], meta["classes"], meta["batch"],
                                            meta["meta_batch"], steps, meta["arch"], args.device, args.threads)
        ratio = meta_rows[impl]["ms"] / meta_rows["plain"]["ms"]
        print(f"step {impl:<15} {meta_rows[impl]['ms']:9.1f} ms {meta_rows[impl]['peak_mib']:8.1f} MiB "
              f"({ratio:.2f}x plain)")
    out = {"quick": args.quick, "steps": steps, "threads": args.threads, "device": args.device,
           "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
           "memory": "peak RSS (CPU) or max_memory_allocated (CUDA) of the timed steps beyond their inputs, "
                     "each case in a fresh process",
           "isda": isda_rows, "meta_step": {"setting": meta, "steps": meta_rows}}
    name = "isda_speed_quick" if args.quick else "isda_speed"
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    path.with_suffix(".md").write_text(markdown(out))
    print(f"saved {path} and {path.with_suffix('.md').name}")


def markdown(out: dict) -> str:
    lines = [f"# ISDA and MetaSAug speed ({out['device']}, {out['threads']} threads, torch {out['torch']}"
             f"{', quick' if out['quick'] else ''})", "",
             f"Median of {out['steps']} steps; memory: {out['memory']}.", "",
             "| covariance | C x d | tailaug ms | tailaug MiB | naive ms | naive MiB | naive [N,C,A] MiB | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["isda"]:
        lines.append(f"| {r['covariance']} | {r['classes']} x {r['features']} | {r['tailaug']['ms']:.1f} | "
                     f"{r['tailaug']['peak_mib']:.1f} | {r['naive']['ms']:.1f} | {r['naive']['peak_mib']:.1f} | "
                     f"{r['naive_largest_tensor_mib']:.0f} | {r['speedup']:.1f}x |")
    steps, setting = out["meta_step"]["steps"], out["meta_step"]["setting"]
    lines += ["", f"One training step: {setting['arch']}, {setting['size']}x{setting['size']}x3, batch "
              f"{setting['batch']}, {setting['classes']} classes, meta batch {setting['meta_batch']}.", "",
              "| step | ms | x plain | MiB |", "|---|---:|---:|---:|"]
    for name, r in steps.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['ms'] / steps['plain']['ms']:.2f} | {r['peak_mib']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
