"""Accuracy of tailaug's methods on Fashion-MNIST-LT (IF 100), seeds 0-2, on the CPU.

Stage-1 rows train ResNet-32 for 30 epochs (configs/fmnist_lt/*.yaml). Stage-3 rows re-train
the classifier on the cached features of each seed's mixup model, as the paper does
(cRT + mixup, then noise, dropout and STG with its lambda / memory ablations,
plus LWS, tau-norm and NCM). FSA and FASA are compared with cRT and STG on mixup models
trained with data.val_per_class=20 (FASA adapts on that split; run directories
mixup-val_per_class20-s<seed>), the "(val 20)" rows. The "augmented" group trains the methods
that augment during representation learning (ISDA, MetaSAug, RSG, Remix; their configs in
configs/fmnist_lt/) and scores their stage-1 model. Every run lives in
benchmarks/out/fmnist_lt/<method>-s<seed> and is reused when the script runs again, so it can be
stopped and restarted.

    .venv/bin/python benchmarks/fmnist_lt.py [--seeds 0 1 2] [--groups stage1 stage3 losses augmented] [--only TEXT]

Writes benchmarks/results/fmnist_lt.json (every run's metrics; a row already there is not
run again), fmnist_lt_time.json (each stage-3 row's time split into cache read, stage 2,
synthesis and re-training, and the size of the spatial cache) and fmnist_lt.md (tables
shaped like the paper's Tables 1, 6 and 7: mean +- sample std over seeds; the times).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

from tailaug.config import load_config
from tailaug.engine.shards import dense
from tailaug.evaluation.report import mean_std_table, write_json
from tailaug.evaluation.results import record_results
from tailaug.evaluation.scoring import score
from tailaug.stages.features import extract_features
from tailaug.stages.pipeline import ensure_generator, ensure_stage1, retrain
from tailaug.stages.spatial import spatial_path, spatial_source

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "configs" / "fmnist_lt"
OUT = HERE / "out"  # run directories (not committed)
RESULTS = HERE / "results"  # measured numbers (committed); rows already there are not run again

STAGE1 = {"CE": "ce.yaml", "mixup": "mixup.yaml"}
LOSSES = {
    "focal (gamma 1)": "focal.yaml", "LDAM-DRW": "ldam_drw.yaml",
    "balanced softmax": "balanced_softmax.yaml", "logit adjustment (loss)": "logit_adjust.yaml",
}
# augmentation while the backbone trains (issue #9): stage-1 rows, beside CE, mixup and LDAM-DRW
AUGMENTED_STAGE1 = {
    "ISDA (CE)": "isda.yaml", "MetaSAug (CE)": "metasaug.yaml", "MetaSAug (LDAM-DRW)": "metasaug_ldam_drw.yaml",
    "RSG (LDAM-DRW)": "rsg.yaml", "Remix": "remix.yaml",
}
STG = {"name": "stg", "lam": 1.5, "t": 0.5}
STAGE3 = {  # label -> (overrides of the mixup config)
    "cRT + mixup": ["retrain.augmenter={name: none}"],
    **{f"+ noise std {s}": [f"retrain.augmenter={{name: noise, std: {s}}}"] for s in (0.1, 0.5, 1.0, 1.5)},
    **{f"+ dropout p {p}": [f"retrain.augmenter={{name: dropout, p: {p}}}"] for p in (0.1, 0.2, 0.3)},
    **{f"+ STG lambda {lam}": [f"retrain.augmenter={{name: stg, lam: {lam}}}"] for lam in (0.5, 1.0, 1.5)},
    **{f"+ STG m={m}": [f"stg.memory_size={m}", "retrain.augmenter={name: stg, lam: 1.5}"] for m in (0, 600, 1200)},
    "+ STG without the mu term": ["retrain.augmenter={name: stg, lam: 1.5, mu_scale: 0.0}"],
    "LWS + mixup": ["retrain.method=lws", "retrain.augmenter={name: none}"],
    "tau-norm + mixup (tau 1)": ["retrain.method=tau_norm", "retrain.tau=1.0", "retrain.augmenter={name: none}"],
    "NCM + mixup": ["retrain.method=ncm", "retrain.augmenter={name: none}"],
    # The other feature-space augmenters against cRT and STG on the same backbones: FASA adapts
    # its sampling rates on a validation split, so these mixup models hold out 20 images per class
    **{f"{label} (val 20)": ["data.val_per_class=20", f"retrain.augmenter={aug}"] for label, aug in (
        ("cRT + mixup", "{name: none}"),
        ("+ STG lambda 1.5", "{name: stg, lam: 1.5}"),
        ("+ FSA (offline)", "{name: fsa, maps: offline}"),  # Chu et al., phases II-III, defaults of augment/fsa.py
        ("+ FASA", "{name: fasa}"),
    )},
    # issue #13: the feature cache stored in float16 (half the size) against float32, same backbones
    "cRT + mixup (val 20, float16 cache)": ["data.val_per_class=20", "features.dtype=float16",
                                            "retrain.augmenter={name: none}"],
    "+ STG lambda 1.5 (val 20, float16 cache)": ["data.val_per_class=20", "features.dtype=float16",
                                                 "retrain.augmenter={name: stg, lam: 1.5}"],
}
VAL20 = [label for label in STAGE3 if label.endswith("(val 20)")]
FLOAT16 = ["cRT + mixup (val 20)", "cRT + mixup (val 20, float16 cache)", "+ STG lambda 1.5 (val 20)",
           "+ STG lambda 1.5 (val 20, float16 cache)"]
TIME_COLUMNS = ["cache_s", "stage2_s", "synthesis_s", "retrain_s", "spatial_cache_mib"]


def config(name: str, seed: int, extra=(), epochs: int = 30):
    # a validation split changes the stage-1 model: it names its own run directory
    stem = Path(name).stem + "".join(f"-val_per_class{o.split('=', 1)[1]}" for o in extra
                                     if o.startswith("data.val_per_class="))
    return load_config(CONFIGS / name, [f"run.seed={seed}", f"run.name={stem}-s{seed}",
                                        f"run.output_dir={OUT / 'fmnist_lt'}", f"train.epochs={epochs}",
                                        *extra])


def stage1_row(name: str, seed: int, epochs: int, extra=()) -> dict:
    cfg = config(name, seed, extra, epochs)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ensure_stage1(cfg, run_dir, progress=False)
    cache = extract_features(cfg, run_dir, progress=False)
    return score(dense(cache["test_logits"]), cache["test_labels"], cache["class_counts"].tolist(), cfg)


def stage3_row(seed: int, overrides, epochs: int, timings: dict) -> dict:
    """The row's test metrics; ``timings`` gets its stage-3 time split (seconds): reading the
    feature cache and the spatial maps (written instead on their first use), training or
    loading the generator (stage 2), the augmenter's synthesis (summed from the stage-3
    history) and the rest of the re-training; and the spatial cache's size in MiB."""
    cfg = config("mixup.yaml", seed, overrides, epochs)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ensure_stage1(cfg, run_dir, progress=False)
    aug = cfg.retrain.augmenter
    t0 = time.perf_counter()
    cache = extract_features(cfg, run_dir, progress=False)
    request = aug.spatial_request()
    spatial = spatial_source(cfg, run_dir, request, progress=False) if request is not None else None
    t1 = time.perf_counter()
    gen = ensure_generator(cfg, run_dir, cache, False) if aug.uses_generator else None
    t2 = time.perf_counter()
    label, row = retrain(cfg, run_dir, cache, aug, gen, progress=False, spatial=spatial)
    t3 = time.perf_counter()
    record_results(run_dir, {label: row})  # the run's results.json too, for `tailaug report`
    [stored] = (run_dir / "retrain").glob(f"*-{row['key']}.json")
    synthesis = sum(h.get("augment_s", 0.0) for h in json.loads(stored.read_text())["history"])
    maps = spatial_path(run_dir, cfg, request.dtype) if request is not None and not request.online else None
    timings.update(cache_s=t1 - t0, stage2_s=t2 - t1, synthesis_s=synthesis, retrain_s=t3 - t2 - synthesis,
                   spatial_cache_mib=maps.stat().st_size / 2**20 if maps is not None else None)
    return row["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--groups", nargs="+", default=["stage1", "stage3", "losses", "augmented"],
                        choices=["stage1", "stage3", "losses", "augmented"])
    parser.add_argument("--only", metavar="TEXT", help="run only the rows whose label contains TEXT, e.g. '(val 20)'")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from the JSON")
    args = parser.parse_args()
    store, time_store = RESULTS / "fmnist_lt.json", RESULTS / "fmnist_lt_time.json"
    results: dict[str, dict[str, dict]] = json.loads(store.read_text()) if store.is_file() else {}
    times: dict[str, dict[str, dict]] = json.loads(time_store.read_text()) if time_store.is_file() else {}

    def record(label, seed, fn, timing=None):
        key = f"s{seed}"
        if key not in results.get(label, {}) and (args.only is None or args.only in label):
            t0 = time.perf_counter()
            results.setdefault(label, {})[key] = fn()
            print(f"{label:<32} seed {seed}: top1 {results[label][key]['top1']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            write_json(store, results)
            if timing:
                times.setdefault(label, {})[key] = timing
                write_json(time_store, times)
    if args.report_only:
        args.seeds, args.groups = [], []
    for seed in args.seeds:
        if "stage1" in args.groups:
            for label, name in STAGE1.items():
                record(label, seed, lambda: stage1_row(name, seed, args.epochs))
            record("CE + post-hoc logit adjustment (tau 1)", seed,
                   lambda: stage1_row("ce.yaml", seed, args.epochs, ["eval.logit_adjust_tau=1.0"]))
        if "stage3" in args.groups:
            for label, overrides in STAGE3.items():
                timing: dict = {}
                record(label, seed, lambda: stage3_row(seed, overrides, args.epochs, timing), timing)
    for group, rows in (("losses", LOSSES), ("augmented", AUGMENTED_STAGE1)):
        if group in args.groups:
            for seed in args.seeds:
                for label, name in rows.items():
                    record(label, seed, lambda: stage1_row(name, seed, args.epochs))
    write_report(results, times)


def write_report(results: dict, times: dict) -> None:
    def table(labels):
        rows = {lab: list(results[lab].values()) for lab in labels if lab in results}
        return mean_std_table(rows) if rows else "(not run)"

    main_rows = ["CE", "mixup", "CE + post-hoc logit adjustment (tau 1)", *LOSSES, "cRT + mixup",
                 "LWS + mixup", "tau-norm + mixup (tau 1)", "NCM + mixup", "+ noise std 1.0",
                 "+ dropout p 0.3", "+ STG lambda 1.5", "+ STG without the mu term"]
    text = [
        "# Fashion-MNIST-LT (IF 100), ResNet-32, 30 epochs, seeds 0-2 (mean ± sample std)\n",
        "## Main table (paper Table 1)\n", table(main_rows),
        "\n## Memory size of the STG dictionary (paper Table 6)\n",
        table([f"+ STG m={m}" for m in (0, 600, 1200)]),
        "\n## Against other strategies for the tail (paper Table 7)\n",
        table([lab for lab in STAGE3 if lab.startswith(("+ noise", "+ dropout", "+ STG lambda")) and "(val 20" not in lab]),
        "\n## Other feature-space augmenters: FSA (Chu et al.) and FASA (on mixup models with a validation split)\n",
        table(VAL20),
        "\n## The feature cache in float16 against float32 (the same mixup models with a validation split)\n",
        table(FLOAT16),
        "\n## Augmentation during representation learning: ISDA, MetaSAug, RSG, Remix (stage 1, last epoch)\n",
        table(["CE", "mixup", "LDAM-DRW", *AUGMENTED_STAGE1]),
    ]
    timed = {lab: list(runs.values()) for lab, runs in times.items() if runs}
    if timed:
        text += ["\n## Stage-3 time per row (s; spatial cache in MiB)\n",
                 "cache_s: reading the feature cache and the spatial maps (written instead on first use); "
                 "stage2_s: the STG generator (trained or loaded); synthesis_s: time in the augmenter; "
                 "retrain_s: the rest of the classifier's re-training.\n",
                 mean_std_table(timed, TIME_COLUMNS)]
        total = [sum(r[c] or 0.0 for c in TIME_COLUMNS[:4]) for runs in timed.values() for r in runs]
        text.append(f"\nStage 2 + stage 3 on cached features: at most {max(total):.1f} s per run "
                    f"(median {median(total):.1f} s) on this machine.\n")
    path = RESULTS / "fmnist_lt.md"
    path.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
