"""Why does (or doesn't) STG beat cRT on Fashion-MNIST-LT? Stage-3 variants on cached features.

Re-uses the mixup models and feature caches of benchmarks/fmnist_lt.py (run that first) and
varies one thing at a time against cRT + STG (lambda 1.5): the mean term, the token choice,
the head set, the augmented classes, the strength, and the number of re-training epochs.
Each row is stages 2-3 only (seconds).

    .venv/bin/python benchmarks/stg_investigation.py [--seeds 0 1 2]

Writes benchmarks/results/stg_investigation.{json,md}.
"""

from __future__ import annotations

import argparse

from fmnist_lt import RESULTS, stage3_row

from tailaug.evaluation.report import mean_std_table, write_json

STG = "retrain.augmenter={name: stg, lam: 1.5%s}"
VARIANTS = {
    "cRT + mixup": ["retrain.augmenter={name: none}"],
    "+ STG (paper default)": [STG % ""],
    "+ STG, mu term off": [STG % ", mu_scale: 0.0"],
    "+ STG, mu term x0.5": [STG % ", mu_scale: 0.5"],
    "+ STG, token by stage-1 classifier": [STG % ", token: classifier"],
    "+ STG, head = top-3 classes": [STG % "", "stg.head.rule=top_k", "stg.head.top_k=3"],
    "+ STG, head = classes > 1000": [STG % "", "stg.head.rule=threshold", "stg.head.threshold=1000"],
    "+ STG, all classes augmented": [STG % ", targets: all"],
    "+ STG, t = 1 (replace every coordinate)": [STG % ", t: 1.0"],
    "+ STG, lambda 3": ["retrain.augmenter={name: stg, lam: 3.0}"],
    "+ STG, KL loss": [STG % "", "stg.loss=kl"],
    "cRT + mixup, 60 epochs": ["retrain.augmenter={name: none}", "retrain.epochs=60"],
    "+ STG, 60 epochs": [STG % "", "retrain.epochs=60"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    timings: list[float] = []
    for label, overrides in VARIANTS.items():
        for seed in args.seeds:
            results.setdefault(label, []).append(stage3_row(seed, overrides, 30, timings))
        print(f"{label:<42} top1 {sum(r['top1'] for r in results[label]) / len(args.seeds):.2f}", flush=True)
    write_json(RESULTS / "stg_investigation.json", results)
    text = ("# STG on Fashion-MNIST-LT: one change at a time (stage 3 on the mixup features, "
            f"seeds {args.seeds})\n\n" + mean_std_table(results) + "\n")
    (RESULTS / "stg_investigation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
