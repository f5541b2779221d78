"""Decoupled classifiers for stage 3 (Kang et al. 2019), one file each.

Each file registers a fit function ``Stage3Inputs -> nn.Module`` in
``tailaug.registry.CLASSIFIERS`` under the name ``retrain.method`` gives, with the label
result tables use, the ``retrain`` options its result depends on (``reads``, for the stage
key) and, where the rest of the config can rule it out, a ``check``. Trained classifiers
hand their module to :func:`tailaug.stages.classifier.fit_trained` (augmenter, sampler,
Adam, cross-entropy); the others compute theirs from the stage-1 head or the features.
"""
