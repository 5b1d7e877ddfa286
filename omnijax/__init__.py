"""omnijax: JAX/Flax pretraining of Qwen3-Omni-style models.

``omnijax.load(path)`` (``omnijax.api.load``) loads a Thinker from a workdir or a transformers
directory. It is imported on first access, so ``import omnijax`` stays light.
"""

__all__ = ["load"]


def __getattr__(name: str):
  if name == "load":
    from omnijax.api import load  # pylint: disable=import-outside-toplevel

    return load
  raise AttributeError(f"module 'omnijax' has no attribute {name!r}")
