"""tailaug: long-tailed image classification with feature-space augmentation.

``tailaug.load(RUN_DIR, classifier="final")`` returns a finished run as a module (see
:mod:`tailaug.predictor`); it is imported on first use, so ``import tailaug`` stays light.
"""


def __getattr__(name: str):
    if name == "load":
        from .predictor import load

        return load
    raise AttributeError(f"module 'tailaug' has no attribute {name!r}")
