"""tailaug: long-tailed classification with feature-space augmentation.

The scikit-learn API is imported on first use, so ``import tailaug`` stays cheap:
``tailaug.LongTailClassifier`` and ``tailaug.FeatureAugmentSampler`` (``tailaug.estimators``).
"""

_LAZY = {"LongTailClassifier": "estimators", "FeatureAugmentSampler": "estimators"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
