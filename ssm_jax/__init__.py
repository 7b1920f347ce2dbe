"""ssm_jax: Self-Supervised Masking anomaly detection and localization in JAX/Flax."""

__version__ = "0.1.0"
