"""repjax: re-parameterized vision models in JAX/Flax."""

__version__ = "0.1.0"
