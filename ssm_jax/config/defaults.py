"""The full set of config keys with defaults; files in configs/ start from this.

Every key a user may set lives here, so an unknown key or a wrong type on the command
line is caught before anything runs (see ``ssm_jax.config.loader``).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Default configuration (paper settings where the paper states them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # MVTec-layout folder; "" = embedded synthetic data
    # How data.path is laid out: auto (chosen from the folder), mvtec (also MPDD), visa
    # (ROOT/<category>, split_csv/1cls.csv) or btad (ssm_jax.data.layouts).
    c.data.layout = "auto"
    c.data.image_size = 128
    c.data.grayscale = False
    c.data.val_fraction = 0.1  # held-out normal train images: checkpoint choice, threshold
    c.data.synthetic_num_train = 200
    # Native resolution: keep_aspect loads images with their shorter side = image_size and
    # the aspect ratio kept (padded to a common shape, padding excluded from scores and
    # metrics); crop_size > 0 trains on random crop_size squares. Scoring always sees the
    # whole image (the network is fully convolutional).
    c.data.keep_aspect = False
    c.data.crop_size = 0
    # Training images from data.path: "auto" keeps them decoded in memory up to 256 MiB
    # of uint8 (fastest for small sets) and streams them from their files above that (host
    # memory flat in the set's size; each host decodes only its rows); "true" / "false"
    # force one path. Both give the same batches (ssm_jax.data.stream).
    c.data.stream = "auto"

    c.model = ml_collections.ConfigDict()
    c.model.width = 64
    c.model.mask_input = True
    c.model.dtype = "float32"  # or "bfloat16" (compute only; params stay float32)
    # Training BatchNorm statistics over the global batch ("all": every device of every
    # host), each host's devices ("host") or each device's rows ("device"); running
    # averages are averaged over all devices either way. Same results on one device.
    c.model.batchnorm_sync = "all"

    c.mask = ml_collections.ConfigDict()
    c.mask.ks = (2, 4, 8)
    c.mask.num_masks = 3
    c.mask.families = ("grid",)
    c.mask.family_weights = (1.0,)
    c.mask.k_schedule = "constant"  # constant | coarse_to_fine | fine_to_coarse

    c.loss = ml_collections.ConfigDict()
    c.loss.mse_weight = 1.0
    c.loss.gms_weight = 1.0
    c.loss.ssim_weight = 1.0
    c.loss.mask_weight = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global batch over all devices and hosts
    c.train.steps = 10000
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 1e-5
    c.train.lr_decay_fractions = (0.3, 0.6, 0.9)  # paper: epochs 15/30/45 of 50
    c.train.lr_decay_factor = 0.1
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 500  # validation loss on held-out normals -> best checkpoint
    c.train.keep_checkpoints = 2
    # Training steps per call of the compiled step (a lax.scan over k batches): fewer
    # dispatches and host round trips where the host cannot keep up with a short step.
    # Same batches, keys and results for any value; checkpoints and validation still
    # come at their steps.
    c.train.steps_per_call = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.ks = (2, 4, 8)
    c.eval.refine_passes = 1
    c.eval.refine_rule = "quantile"
    c.eval.refine_quantile = 0.5
    c.eval.refine_threshold = 0.0
    c.eval.refine_cell = 8
    c.eval.refine_mask_head_weight = 0.0
    c.eval.mask_head_weight = 0.0
    c.eval.sigma_at_128 = 7.0
    c.eval.image_score = "max"
    c.eval.mask_draws = 1  # independent scoring-mask draws per k, maps averaged
    # hash: masks a pure function of (seed, image content), equal in every export;
    # threefry: jax.random (what runs saved before this key used; they keep it)
    c.eval.mask_rule = "hash"
    c.eval.k_weighting = "equal"  # equal | area (k^2, the published code's 1/N^2)
    c.eval.border = "edge"  # edge | zero (the published MS-GMS padding)
    # mse: image score + restoration MSE, each standardized by the held-out normals
    c.eval.image_score_fusion = "none"  # none | mse
    c.eval.map_normalization = "none"  # none | val_zscore (per-pixel, by val normals)
    c.eval.threshold_quantile = 0.99
    # conformal: with map statistics, each image's threshold is the quantile of the normals'
    # scores with it among their statistics (exact rate; ssm_jax.method.conformal);
    # quantile: one threshold for every image (flags too few where normals come in kinds).
    c.eval.threshold_rule = "conformal"
    c.eval.num_overlays = 8
    # Images of a test set that get overlay and thumbnail files in evaluate's report (a
    # fixed random sample plus the hardest cases); every image keeps its per_image.csv row.
    c.eval.report_images = 200
    c.eval.seed = 1234
    return c
