"""Issue #11: can feature-space augmentation beat balanced softmax on Fashion-MNIST-LT?

Both class orders (the dataset's own, and the hard-tail order of configs/fmnist_lt/hard_tail.yaml,
where Coat and Shirt are the tail), seeds 0-2. Every row starts from the same stage-1 model
per seed: ResNet-32 trained 30 epochs with the balanced-softmax loss, with a balanced validation
split of 100 images per class taken from the images the long-tailed draw leaves unused (the
largest class gives up 100 of its 6,000). Stage-3 rows re-train the classifier on its cached
features; a row marked "[... on validation]" chooses its options on the validation split
(``retrain.select``, top-1; "[... on validation NLL]": the lowest negative log-likelihood) and
meets the test set once, with the chosen classifier. The "best on validation" row applies one
rule to every seed and order: of the augmented rows chosen by top-1, the one whose chosen point
scored highest on validation.

``--backbones`` adds stage-1 models trained with other losses (CE, LDAM-DRW, and balanced
softmax with ISDA's implicit feature augmentation during stage 1, alone or refined by MetaSAug's
meta step on the validation split), same epochs and validation split; on each, its stage-1 row
and the main stage-3 rows (cRT, STG at the paper's defaults and chosen on validation, STG
implicit, balanced-softmax stage 3), labelled with the backbone.

One row re-weighs the prior at test time instead of augmenting: the balanced-softmax model's
logits minus tau * log(prior), tau from -1 to 1 chosen on validation. It tells a missing bias
(a better tau) from a missing boundary shape (what the oracles below add).

Two oracle rows bound what any stage-3 augmentation can reach on these backbones: cRT trained
on the real features of all 60,000 training images (6,000 per class), and on the long-tailed
features plus the real features of every training image of the tail classes. They read images
the long-tailed set does not have, so they are bounds, not methods.

    .venv/bin/python benchmarks/feature_aug.py [--seeds 0 1 2] [--orders default hard_tail]
        [--backbones "balanced softmax" CE LDAM-DRW "balanced softmax + ISDA" "balanced softmax + MetaSAug"]
        [--only TEXT ...] [--report-only]

Writes benchmarks/results/feature_aug.json (every run's test metrics and its choices; a row
already there is not run again) and feature_aug.md. Run directories: benchmarks/out/fmnist_lt/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fmnist_lt
from fmnist_lt import config
from tailaug.data.datasets import Split
from tailaug.data.sources import load_idx
from tailaug.engine.shards import dense
from tailaug.evaluation.report import mean_std_table, write_json
from tailaug.evaluation.scoring import score, validation_score
from tailaug.losses import adjust_logits
from tailaug.stages.classifier import predict, retrain_classifier
from tailaug.stages.features import extract_features
from tailaug.stages.pipeline import ensure_generator, head_set, retrain
from tailaug.stages.stage1_model import load_finished

RESULTS = Path(__file__).parent / "results"
ORDERS = {"default": "balanced_softmax.yaml", "hard_tail": "hard_tail_balanced_softmax.yaml"}
VALIDATION = ["data.val_per_class=100"]
GRID = "{augmenter.lam: [0.5, 1.0, 1.5], augmenter.mu_scale: [0.0, 0.5, 1.0]}"
WIDE = "{augmenter.lam: [1.0, 2.0, 4.0, 8.0]}"  # beyond the grid's edge, which the implicit rows chose
LOW_RANK = ["stg.loss=nll", "stg.rank=4"]
BALANCED_SOFTMAX = ["retrain.loss=[{name: balanced_softmax}]", "retrain.sampler={kind: instance}"]


def stg(options: str = "", select: bool = True, grid: str = GRID, metric: str = "top1") -> list[str]:
    chosen = [f"retrain.select={{grid: {grid}, metric: {metric}}}"] if select else []
    return [f"retrain.augmenter={{name: stg, lam: 1.5{options}}}", *chosen]


STAGE3 = {  # label -> overrides of the backbone's config
    "cRT": ["retrain.augmenter={name: none}"],
    "cRT + STG (paper defaults, lambda 1.5)": stg(select=False),
    "cRT + STG [lambda, mu_scale on validation]": stg(),
    "cRT + STG, clamped, half the tail rows [lambda, mu_scale on validation]": stg(", rows: 0.5, clamp: true"),
    "cRT + STG implicit [lambda, mu_scale on validation]": stg(", mode: implicit"),
    "cRT + STG, targets from the 10 nearest neighbours [lambda, mu_scale on validation]":
        ["stg.neighbours=10", *stg()],
    "cRT + STG, rank-4 covariance [lambda, mu_scale on validation]": [*LOW_RANK, *stg()],
    "cRT + STG implicit, every class augmented [lambda, mu_scale on validation]":
        stg(", mode: implicit, targets: all"),
    "cRT + STG implicit, no mean term, lambda up to 8 [lambda on validation]":
        stg(", mode: implicit, mu_scale: 0.0", grid=WIDE),
    # chosen by validation NLL, which moves with every image, where top1's grid scores differ by 1-3 images
    "cRT + STG [lambda, mu_scale on validation NLL]": stg(metric="nll"),
    "cRT + STG implicit [lambda, mu_scale on validation NLL]": stg(", mode: implicit", metric="nll"),
    "balanced-softmax stage 3 (instance sampling)": ["retrain.augmenter={name: none}", *BALANCED_SOFTMAX],
    "balanced-softmax stage 3 + STG implicit [lambda, mu_scale on validation]":
        [*stg(", mode: implicit"), *BALANCED_SOFTMAX],
}
AUGMENTED = [label for label in STAGE3 if "on validation]" in label]  # chosen by top1: comparable scores
STAGE1 = "balanced softmax (stage 1)"
# the prior's weight at test time, tried both ways: does the stage-1 classifier miss a bias, not a shape?
POST_HOC = "balanced softmax + post-hoc logit adjustment [tau on validation]"
TAUS = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
BEST = "best on validation (of the rows above marked so)"
ORACLES = ("oracle: cRT on all 6,000 real images per class", "oracle: cRT with every real tail-class image")


MAIN = "balanced softmax"
BACKBONES = {  # stage-1 loss -> its config per class order
    MAIN: ORDERS,
    "CE": {"default": "ce.yaml", "hard_tail": "hard_tail_ce.yaml"},
    "LDAM-DRW": {"default": "ldam_drw.yaml", "hard_tail": "hard_tail_ldam_drw.yaml"},
    "balanced softmax + ISDA": {"default": "balanced_softmax_isda.yaml",
                                "hard_tail": "hard_tail_balanced_softmax_isda.yaml"},
    # the meta set is the benchmark's validation split (100 per class), as it is for retrain.select
    "balanced softmax + MetaSAug": {"default": "balanced_softmax_metasaug.yaml",
                                    "hard_tail": "hard_tail_balanced_softmax_metasaug.yaml"},
}
ON_EVERY_BACKBONE = ["cRT", "cRT + STG (paper defaults, lambda 1.5)", "cRT + STG [lambda, mu_scale on validation]",
                     "cRT + STG implicit [lambda, mu_scale on validation]",
                     "balanced-softmax stage 3 (instance sampling)"]


def rows(name: str) -> dict[str, list[str]]:
    """The stage-3 rows on one backbone, label -> overrides: every row on the balanced-softmax
    backbone (labels as they are), the rows above on the others (labels prefixed)."""
    if name == MAIN:
        return STAGE3
    return {f"{name} backbone: {label}": STAGE3[label] for label in ON_EVERY_BACKBONE}


def stage1_label(name: str) -> str:
    return STAGE1 if name == MAIN else f"{name} (stage 1)"


def backbone(order: str, seed: int, overrides=(), name: str = MAIN):
    return config(BACKBONES[name][order], seed, [*VALIDATION, *overrides])


def stage1_row(order: str, seed: int, name: str = MAIN) -> dict:
    return fmnist_lt.stage1_row(BACKBONES[name][order], seed, 30, VALIDATION)


def stage3_row(order: str, seed: int, overrides, name: str = MAIN) -> dict:
    cfg = backbone(order, seed, overrides, name)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    cache = extract_features(cfg, run_dir, progress=False)
    aug = cfg.retrain.augmenter
    gen = ensure_generator(cfg, run_dir, cache, False) if aug.uses_generator else None
    _, row = retrain(cfg, run_dir, cache, aug, gen, progress=False)
    return {**row["metrics"], "choices": row.get("choices", {})}


def post_hoc_row(order: str, seed: int) -> dict:
    """The balanced-softmax model's own logits minus tau * log(prior), tau in TAUS chosen by
    validation top1 (ties: the smallest |tau|), then the test set once."""
    cfg = backbone(order, seed)
    cache = extract_features(cfg, Path(cfg.run.output_dir) / cfg.run.name, progress=False)
    counts, shots = cache["class_counts"].tolist(), cfg.data.shots
    val = dense(cache["val_logits"]).float()
    scores = [validation_score(adjust_logits(val, counts, tau), cache["val_labels"], counts, "top1",
                               many=shots.many, few=shots.few) for tau in TAUS]
    best = max(range(len(TAUS)), key=lambda i: (scores[i], -abs(TAUS[i])))
    row = score(adjust_logits(dense(cache["test_logits"]).float(), counts, TAUS[best]), cache["test_labels"],
                counts, cfg)
    select = {"metric": "top1", "grid": {"tau": TAUS}, "chosen": {"tau": TAUS[best]}, "score": scores[best],
              "scores": [{"point": {"tau": tau}, "score": s} for tau, s in zip(TAUS, scores)]}
    return {**row, "choices": {"select": select}}


def oracle_row(order: str, seed: int, tail_only: bool) -> dict:
    """cRT on real features the long-tailed set does not have (see the module doc)."""
    cfg = backbone(order, seed, ["retrain.augmenter={name: none}"])
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    cache = extract_features(cfg, run_dir, progress=False)
    counts = cache["class_counts"].tolist()
    stage1 = load_finished(cfg, run_dir)
    images, labels = load_idx(cfg.data.root, cfg.data.dataset, True)
    full = stage1.outputs(Split(labels.numpy(), images), 512)
    x, y = full["features"].float(), full["labels"].long()
    if tail_only:
        tail = torch.tensor([c not in head_set(cfg, counts) for c in range(len(counts))])
        x = torch.cat([dense(cache["train_features"]).float(), x[tail[y]]])
        y = torch.cat([torch.as_tensor(cache["train_labels"]).long(), y[tail[y]]])
    head = retrain_classifier(x, y, torch.bincount(y, minlength=len(counts)).tolist(), cfg.retrain,
                              num_classes=len(counts), seed=seed, progress=False)
    logits = predict(head, cache["test_features"], "cpu")
    return score(logits, cache["test_labels"], counts, cfg)


def best_row(results: dict, order: str, key: str) -> dict | None:
    """The augmented row whose chosen point scored highest on validation (ties: the first);
    None until every augmented row has run on that seed (key "s<seed>")."""
    runs = [(results[order][label][key]["choices"]["select"]["score"], -i, label)
            for i, label in enumerate(AUGMENTED) if key in results[order].get(label, {})]
    if len(runs) < len(AUGMENTED):
        return None
    _, _, label = max(runs)
    return {**results[order][label][key], "row": label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    parser.add_argument("--backbones", nargs="+", default=[MAIN], choices=list(BACKBONES),
                        help="stage-1 models whose rows to run (the oracles and every variant: balanced softmax)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle rows (a pass over 60,000 images)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from the JSON")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="run only the rows whose label contains one of these")
    args = parser.parse_args()
    store = RESULTS / "feature_aug.json"

    def stored() -> dict:
        return json.loads(store.read_text()) if store.is_file() else {}

    results = stored()

    def record(order, label, seed, fn):
        if args.only and not any(text in label for text in args.only):
            return
        runs = results.setdefault(order, {}).setdefault(label, {})
        if f"s{seed}" in runs:
            return
        t0 = time.perf_counter()
        row = fn()
        if row is None:
            return
        results.update(stored())  # rows another run wrote meanwhile are kept
        results.setdefault(order, {}).setdefault(label, {})[f"s{seed}"] = row
        print(f"{order:<9} {label:<60} seed {seed}: top1 {row['top1']:.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        write_json(store, results)

    for order in [] if args.report_only else args.orders:
        for seed in args.seeds:
            for name in args.backbones:
                record(order, stage1_label(name), seed, lambda: stage1_row(order, seed, name))
                if name == MAIN:
                    record(order, POST_HOC, seed, lambda: post_hoc_row(order, seed))
                if name == MAIN and not args.no_oracle:
                    for label, tail_only in zip(ORACLES, (False, True)):
                        record(order, label, seed, lambda: oracle_row(order, seed, tail_only))
                for label, overrides in rows(name).items():
                    record(order, label, seed, lambda: stage3_row(order, seed, overrides, name))
    results.update(stored())
    for order, runs in results.items():  # derived, so always recomputed from the rows as they are now
        seeds = sorted({key for label, row in runs.items() if label != BEST for key in row})
        best = {key: best_row(results, order, key) for key in seeds}
        runs[BEST] = {key: row for key, row in best.items() if row is not None}
    write_json(store, results)
    write_report(results)


def chosen_text(row: dict) -> str:
    select = row.get("choices", {}).get("select")
    if not select:
        return ""
    values = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in select["chosen"].items())
    if select["metric"] == "nll":
        return f"{values} (val NLL {select['score']:.4f})"
    return f"{values} (val {select['score']:.1f})"


def write_report(results: dict) -> None:
    text = ["# Feature-space augmentation against balanced softmax on Fashion-MNIST-LT (issue #11)\n",
            "Backbone: ResNet-32, 30 epochs, validation split of 100 images per class; balanced-softmax loss "
            "unless the row names another backbone. Mean ± sample std over the seeds run (0-2); "
            "medium = the two tail classes.\n"]
    order_of_rows = [STAGE1, POST_HOC, *STAGE3, BEST, *ORACLES,
                     *(label for name in BACKBONES if name != MAIN for label in [stage1_label(name), *rows(name)])]
    for order, table in results.items():
        table = dict(sorted(table.items(), key=lambda kv: order_of_rows.index(kv[0]) if kv[0] in order_of_rows else 99))
        text += [f"\n## Class order: {order}\n",
                 mean_std_table({label: list(runs.values()) for label, runs in table.items()})]
        chosen = [(label, seed, chosen_text(run) if label != BEST else run["row"])
                  for label, runs in table.items() for seed, run in sorted(runs.items())]
        chosen = [c for c in chosen if c[2]]
        if chosen:
            text += ["\nChosen on validation, per seed:\n", "| row | seed | chosen |", "|:---|:---|:---|",
                     *(f"| {label} | {seed} | {value} |" for label, seed, value in chosen)]
    path = RESULTS / "feature_aug.md"
    path.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
