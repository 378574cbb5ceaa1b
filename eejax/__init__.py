"""eejax: early-exit image classifiers in JAX/Flax.

The public API (`eejax.api`), one call each: `train_and_evaluate`,
`load_run`, `fit_thresholds`, `certify_thresholds`, `predict`, `export_run`. Imported on first use,
so `import eejax` stays light.

Names carry shapes, one meaning per letter across the package: E exits (of the
model in hand), T a teacher's exits, J ensemble teachers, B images in a batch,
N images in a split, C classes, D feature channels, H W height and width, K
threshold settings, S steps in a jitted chunk, G grid points, M calibration
bins, P epochs of a BTS-EE stage.
"""

__version__ = "0.1.0"

__all__ = ("train_and_evaluate", "load_run", "fit_thresholds", "certify_thresholds", "predict", "export_run", "Run")


def __dir__():  # tab completion in IPython and Colab lists the API before it is imported
  return sorted({*globals(), *__all__})


def __getattr__(name):
  if name in __all__:
    from eejax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'eejax' has no attribute {name!r}")
