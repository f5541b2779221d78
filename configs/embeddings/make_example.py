"""Write data/embeddings/{train,test}.npz: synthetic long-tailed "embeddings" for
configs/embeddings/example.yaml (10 classes of 64-d Gaussian clusters, 500 down to 10
training rows per class, 100 test rows each, string labels). Run from the repository root:

    python configs/embeddings/make_example.py
"""

from pathlib import Path

import numpy as np

CLASSES = ["cat", "dog", "fox", "owl", "bee", "elk", "emu", "yak", "eel", "ant"]


def main(out: Path = Path("data/embeddings"), dim: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    counts = [int(500 * (1 / 50) ** (c / 9)) for c in range(len(CLASSES))]  # 500 ... 10
    means = rng.normal(0, 1, (len(CLASSES), dim))
    scales = rng.uniform(1.5, 3.0, (len(CLASSES), dim))  # each class spreads along its own directions

    def draw(per_class):
        y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
        x = means[y] + rng.normal(0, 1, (len(y), dim)) * scales[y]
        return x.astype(np.float32), np.array(CLASSES)[y]

    out.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", counts), ("test", [100] * len(CLASSES))):
        x, y = draw(per_class)
        np.savez(out / f"{name}.npz", features=x, labels=y)
        print(f"wrote {out / f'{name}.npz'}: {len(y)} rows of {dim} dimensions")


if __name__ == "__main__":
    main()
