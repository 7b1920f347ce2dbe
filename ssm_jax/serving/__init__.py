"""A trained detector in use: :class:`~ssm_jax.serving.detector.Detector` (``detector``),
its jax.export artifact (``jax_export``, served by ``exported``) and its ONNX model
(``onnx_export``, served without JAX by ``onnx_serving``, which imports numpy and
onnxruntime only and can be copied alone).

May import: every package except ``report`` and ``commands``.
"""
