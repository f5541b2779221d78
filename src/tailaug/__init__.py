"""tailaug: long-tailed image classification with feature-space augmentation.

The Python API is imported on first use, so ``import tailaug`` stays cheap:
``tailaug.LongTailClassifier`` and ``tailaug.FeatureAugmentSampler`` (scikit-learn and
imbalanced-learn, :mod:`tailaug.estimators`), and ``tailaug.load(RUN_DIR,
classifier="final")``, a finished run as a module (:mod:`tailaug.predictor`).
"""

_LAZY = {"LongTailClassifier": "estimators", "FeatureAugmentSampler": "estimators", "load": "predictor"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
