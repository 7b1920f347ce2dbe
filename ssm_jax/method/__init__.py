"""The SSM method as pure functions and modules: the mask-conditioned U-Net (``model``,
``conv_forms``), uint8 pixels scaled in the graph (``pixels``), mask generators
(``masks``; scoring masks that numpy reproduces bit for bit: ``hash_masks``), the losses
(``losses``), per-image scoring with progressive refinement (``scoring``) and anomaly-map
standardization (``normalization``).

May import: ``core``, ``data`` (image-set helpers only).
"""
