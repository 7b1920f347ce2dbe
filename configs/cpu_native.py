"""CPU config at native aspect ratio, for elongated or large parts (``--config.data.path=...``).

``configs/cpu.py`` squashes every image to 64 x 64. Here each image keeps its aspect ratio
with its shorter side at 128 px; the network trains on random 64 px crops (the same cost
per step as cpu.py: about 7.5 minutes for the 1000 steps on the idle 2-core CPU) and scores
whole images, which costs 4-6x cpu.py's evaluation time. See README "Native resolution".

Measured (README, Results; 1000 steps, val_zscore maps): on kolektor (256 x ~645 images,
thin cracks) pixel AUROC 0.813 +- 0.012 over seeds 0-2 against 0.766 for cpu.py (seed
0); AUPRO 0.409 +- 0.023 (0.400) and image AUROC 0.627 +- 0.074 (0.608) are within the
spread. On magnetic_tile (tiles of mixed size and orientation) it is worse than cpu.py
(seed 0: image AUROC 0.588 vs 0.637, pixel AUROC 0.618 vs 0.669; AUPRO 0.436 vs 0.390),
so cpu.py stays the default.

Third round (README, Results; 400 steps, seeds 0-2): on kolektor, hidden cells of 8-32 px
raise pixel AUROC by +0.034 [+0.030, +0.038] and AUPRO by +0.029 [+0.017, +0.042] over
4-16 px cells (benchmarks/results/sweep_native_kolektor).

Fourth round: on magnetic_tile at native resolution the 8-32 px cells are no different
(image -0.009 [-0.065, +0.048], pixel +0.001 [-0.043, +0.044], AUPRO -0.010 [-0.116,
+0.096]; benchmarks/results/sweep_native_magnetic_tile), so by the rule "better on one set,
not worse on the other" they are the default here: ``mask.ks = eval.ks = (8, 16, 32)``
(``--config.mask.ks="(4,8,16)" --config.eval.ks="(4,8,16)"`` for the former cells).
2000 against 1000 steps: on kolektor no difference but F1-max (+0.018 [+0.006, +0.029];
benchmarks/results/sweep_steps_kolektor), on magnetic_tile none (pixel +0.008 [-0.017,
+0.034]; sweep_steps_magnetic_tile), so the 1000 steps of cpu.py stay.
"""

import os

from ssm_jax.config.loader import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.py"))
    c.data.keep_aspect = True
    c.data.image_size = 128  # the shorter side
    c.data.crop_size = 64
    c.eval.batch_size = 8  # whole images are ~2.5-6x the pixels of a crop
    c.mask.ks = (8, 16, 32)  # long enough to hide a thin crack's length (see above)
    c.eval.ks = (8, 16, 32)
    return c
