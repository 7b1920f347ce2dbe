"""ssm_jax: Self-Supervised Masking anomaly detection and localization in JAX/Flax.

The parts, bottom to top: ``core``, ``runtime``, ``data``, ``method``, ``config``,
``runs``, ``training``, ``scoring``, ``serving``, ``report``, ``commands``. Each
subpackage's docstring says what it may import; none imports from a part above it.
"""

from ssm_jax.core.version import __version__  # noqa: F401


def __getattr__(name: str):
    # Lazy: ``import ssm_jax`` stays free of JAX for onnx_serving users.
    if name == "Detector":
        from ssm_jax.serving.detector import Detector

        return Detector
    raise AttributeError(f"module 'ssm_jax' has no attribute {name!r}")
