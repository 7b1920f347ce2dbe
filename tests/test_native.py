"""Native resolution (keep_aspect, crops, padded scoring) and the scoring options of issue 11:
k weighting, the published border rule, score fusion calibrated on held-out normals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ssm_jax.data import folder, load_dataset, pipeline
from ssm_jax.method import losses, normalization, scoring
from ssm_jax.scoring import metrics


def _texture(h, w, seed, defect=None):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 0.5 + 0.2 * np.sin(xx / 2.0 + rng.uniform(0, 6)) * np.cos(yy / 3.0)
    img = img + 0.03 * rng.standard_normal((h, w))
    mask = np.zeros((h, w), np.uint8)
    if defect is not None:
        y, x = defect
        img[y:y + 8, x:x + 8] = 0.0
        mask[y:y + 8, x:x + 8] = 255
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """An MVTec-layout folder of non-square images of two shapes (landscape, portrait)."""
    root = tmp_path_factory.mktemp("wide") / "cat"
    shapes = [(40, 100), (40, 96), (90, 40)]
    for i in range(12):
        h, w = shapes[i % 3]
        os.makedirs(root / "train" / "good", exist_ok=True)
        Image.fromarray(_texture(h, w, i)[0]).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(4):
        h, w = shapes[i % 3]
        os.makedirs(root / "test" / "good", exist_ok=True)
        Image.fromarray(_texture(h, w, 100 + i)[0]).save(root / "test" / "good" / f"{i:03d}.png")
        img, m = _texture(h, w, 200 + i, defect=(10, 12))
        os.makedirs(root / "test" / "hole", exist_ok=True)
        os.makedirs(root / "ground_truth" / "hole", exist_ok=True)
        Image.fromarray(img).save(root / "test" / "hole" / f"{i:03d}.png")
        Image.fromarray(m).save(root / "ground_truth" / "hole" / f"{i:03d}_mask.png")
    return root


def test_keep_aspect_loading_pads_and_records_sizes(wide_folder):
    d = load_dataset(str(wide_folder), 32, True, 0.25, seed=0, keep_aspect=True)
    train, test = d["train"], d["test"]
    assert train.images.shape[1:3] == test.images.shape[1:3]  # one common shape
    h, w = train.images.shape[1:3]
    assert h % 16 == 0 and w % 16 == 0
    sizes = np.concatenate([train.sizes, d["val"].sizes, test.sizes])
    assert set(map(tuple, sizes)) == {(32, 80), (32, 77), (72, 32)}  # shorter side 32
    # Padding repeats the last valid row/column; masks are zero there.
    i = int(np.flatnonzero(test.sizes[:, 0] == 32)[0])
    np.testing.assert_array_equal(test.images[i, 40], test.images[i, 31])
    assert test.masks[:, 72:].sum() == 0 and test.masks.sum() > 0


def test_crop_batches_lie_inside_valid_region():
    imgs = np.zeros((3, 64, 64, 1), np.float32)
    sizes = np.array([[32, 64], [64, 32], [48, 48]])
    for i, (h, w) in enumerate(sizes):
        imgs[i, :h, :w] = 1.0
    it = pipeline.train_batches(imgs, 6, seed=0, crop_size=32, sizes=sizes)
    for _ in range(5):
        b = next(it)
        assert b.shape == (6, 32, 32, 1)
        assert b.min() == 1.0  # never a padded pixel
    a = next(pipeline.train_batches(imgs, 6, seed=0, start_step=3, crop_size=32, sizes=sizes))
    it = pipeline.train_batches(imgs * np.arange(64)[None, :, None, None], 6, seed=0,
                                crop_size=32, sizes=sizes)
    batches = [next(it) for _ in range(4)]
    assert not all(np.array_equal(batches[0], b) for b in batches[1:])  # offsets vary
    assert a.shape == (6, 32, 32, 1)


def _local_restore(masked, m):
    """Ignores the mask and looks at no neighbour: padding cannot reach the valid region."""
    del masked
    return jnp.zeros(m.shape + (1,)) + 0.25, jnp.ones(m.shape)


def _restore_from(x):
    def restore(masked, m):
        return jnp.broadcast_to(jnp.sqrt(x)[None], m.shape + x.shape[-1:]), m
    return restore


@pytest.mark.parametrize("image_score", ["max", "mean_topk"])
def test_padding_amount_never_changes_a_score(image_score):
    """The same image padded to two canvas sizes (as two data sets or two shape buckets
    would) scores the same: masks, composite, maps, blur and image score see only the
    valid region (the restorer here ignores the mask and its neighbours, as a network
    cannot: with a real U-Net the receptive field also sees the edge-replicated pad)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(48, 80, 1)).astype(np.float32)
    x[20:26, 30:36] = 1.0
    small = np.pad(x, ((0, 16), (0, 16), (0, 0)), mode="edge")
    large = np.pad(x, ((0, 48), (0, 48), (0, 0)), mode="edge")
    sc = scoring.ScoringConfig(ks=(4, 8), image_score=image_score, sigma_side=48)
    key = jax.random.PRNGKey(3)
    hw = jnp.array([48, 80])
    a = scoring.score_image(_restore_from(jnp.asarray(small)), key, jnp.asarray(small), sc, hw)
    b = scoring.score_image(_restore_from(jnp.asarray(large)), key, jnp.asarray(large), sc, hw)
    np.testing.assert_allclose(float(a["score"]), float(b["score"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a["map"])[:48, :80], np.asarray(b["map"])[:48, :80],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(a["mse"]), float(b["mse"]), rtol=1e-5)
    # Extreme values in the padded part of a map never reach the image score.
    m = np.asarray(a["map"]).copy()
    m[48:, :] = 1e6
    valid = scoring.valid_mask(m.shape, hw)
    assert float(scoring.image_score(jnp.asarray(m), image_score, 0.01, valid)) == (
        pytest.approx(float(a["score"]), rel=1e-5))
    # Without the valid size the padding is scored as image content and the map changes.
    c = scoring.score_image(_restore_from(jnp.asarray(large)), key, jnp.asarray(large), sc)
    assert not np.allclose(np.asarray(b["map"])[:48, :80], np.asarray(c["map"])[:48, :80],
                           atol=1e-4)


def test_refinement_never_hides_padding():
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(32, 48, 1)), jnp.float32)
    sc = scoring.ScoringConfig(ks=(4,), refine_passes=3, refine_cell=8, sigma_side=32)
    out = scoring.score_image(_local_restore, jax.random.PRNGKey(0), x, sc,
                              jnp.array([24, 40]))
    susp = np.asarray(out["suspicious"])
    assert susp[24:].sum() == 0 and susp[:, 40:].sum() == 0
    assert 0 < susp[:24, :40].sum() < 24 * 40


def test_metrics_ignore_padded_pixels():
    rng = np.random.default_rng(2)
    maps = rng.uniform(size=(4, 16, 24)).astype(np.float32)
    gt = np.zeros((4, 16, 24), np.float32)
    gt[1, 2:6, 3:7] = 1
    gt[3, 8:12, 1:5] = 1
    sizes = np.array([[16, 24], [12, 20], [16, 16], [14, 24]])
    labels = np.array([0, 1, 0, 1])
    # Reference: the valid pixels only, flattened into one row of "images".
    valid = np.zeros_like(gt, bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    got = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, maps, sizes=sizes)
    assert got["pixel_auroc"] == pytest.approx(metrics.roc_auc(gt[valid], maps[valid]))
    # Padded pixels with extreme scores must not move the pixel AUROC.
    spoiled = np.where(valid, maps, 100.0)
    got2 = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, spoiled, sizes=sizes)
    assert got2["pixel_auroc"] == pytest.approx(got["pixel_auroc"])
    assert got2["aupro"] == pytest.approx(got["aupro"])
    no_sizes = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, spoiled)
    assert no_sizes["pixel_auroc"] != pytest.approx(got["pixel_auroc"])


def test_normalization_with_sizes_uses_valid_pixels_only():
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(6, 8, 8))
    sizes = np.array([[8, 8], [8, 8], [4, 8], [8, 8], [8, 4], [8, 8]])
    stats = normalization.fit(maps, sizes)
    # Pixel (6, 6) is valid in images 0, 1, 3, 5 only.
    ref = maps[[0, 1, 3, 5], 6, 6]
    assert stats["mean"][6, 6] == pytest.approx(ref.mean(), rel=1e-5)
    loo = normalization.standardize_leave_one_out(maps, sizes)
    # Image 0 at (6, 6) is standardized by images 1, 3, 5.
    rest = maps[[1, 3, 5], 6, 6]
    floor_free = (maps[0, 6, 6] - rest.mean()) / rest.std()
    assert np.sign(loo[0, 6, 6]) == np.sign(floor_free)
    assert abs(loo[0, 6, 6]) <= abs(floor_free) + 1e-6
    # Without padding it is the earlier exact rule.
    np.testing.assert_allclose(normalization.standardize_leave_one_out(maps, None),
                               normalization.standardize_leave_one_out(maps), rtol=1e-6)


def test_fusion_standardizes_both_parts_leave_one_out():
    s = np.array([1.0, 2.0, 3.0, 4.0])
    m = np.array([0.1, 0.1, 0.3, 0.5])
    f = normalization.fit_fusion(s, m)
    fused = normalization.fuse(s, m, f)
    ref = (s - s.mean()) / s.std() + (m - m.mean()) / m.std()
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    loo = normalization.fuse_leave_one_out(s, m)
    rest = np.array([0, 1, 2])
    assert loo[3] == pytest.approx(float(normalization.fuse(
        s[3], m[3], normalization.fit_fusion(s[rest], m[rest]))))


def test_area_k_weighting_matches_published_division():
    sc = scoring.ScoringConfig(ks=(2, 4, 8), k_weighting="area")
    w = np.array(sc.k_weights())
    # Published: each k's map divided by N^2, N = S/k cells a side: proportional to k^2.
    n_sq = np.array([(64 / k) ** 2 for k in (2, 4, 8)])
    np.testing.assert_allclose(w / w.sum(), (1 / n_sq) / (1 / n_sq).sum(), rtol=1e-6)
    assert scoring.ScoringConfig(ks=(2, 4, 8)).k_weights() == (1.0, 1.0, 1.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(32, 32, 1)), jnp.float32)
    key = jax.random.PRNGKey(0)

    def restore(masked, m):  # normalized blur of the visible pixels: depends on the mask
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        den = losses.gaussian_blur(m, 1.5)
        return (num / jnp.maximum(den, 1e-3))[..., None], m

    ones = jnp.ones((32, 32))
    area = scoring.single_pass(restore, key, x, ones, sc)
    # Same key, same masks: the raw map is the k^2-weighted sum of the per-k maps.
    eq = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(2, 4, 8)))
    assert not np.allclose(np.asarray(eq["raw"]), np.asarray(area["raw"]))
    grid = scoring.masks.scoring_masks(key, (32, 32), (2, 4, 8), 3)
    maps = []
    for i in range(3):
        eff = grid[i]
        rest, _ = restore(x[None] * eff[..., None], eff)
        x_hat = losses.composite(rest, eff)
        maps.append(np.asarray(losses.ms_gms_anomaly_map(x[None], x_hat[None]))[0])
    np.testing.assert_allclose(np.asarray(area["raw"]), np.tensordot(w, np.stack(maps), 1),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eq["raw"]), np.sum(maps, 0), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="k_weighting"):
        scoring.ScoringConfig(k_weighting="bogus").validate(64)


def test_zero_border_is_the_published_rule():
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(1, 32, 36, 1)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)

    def published_gms(a, b, c=losses.GMS_C):
        def grad(z):
            z = ndimage.median_filter(z, size=3, mode="constant", cval=0.0)
            gx = ndimage.correlate(z, np.array([[-1, 0, 1]] * 3) / 3.0)[1:-1, 1:-1]
            gy = ndimage.correlate(z, np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]]) / 3.0)
            return np.sqrt(gx ** 2 + gy[1:-1, 1:-1] ** 2 + 2.220446049250313e-16)
        ga, gb = grad(a[0, ..., 0].astype(np.float64)), grad(b[0, ..., 0].astype(np.float64))
        return (2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c)

    got = np.asarray(losses.gms_map(jnp.asarray(x), jnp.asarray(y), border="zero"))[0]
    assert got.shape == (30, 34)
    np.testing.assert_allclose(got, published_gms(x, y), rtol=1e-4, atol=1e-5)
    m = losses.ms_gms_anomaly_map(jnp.asarray(x), jnp.asarray(y), border="zero")
    assert m.shape == (1, 32, 36)
    tiny = losses.ms_gms_anomaly_map(jnp.asarray(x[:, :12, :14]), jnp.asarray(y[:, :12, :14]),
                                     border="zero")  # coarsest scale 1 px: edge rule there
    assert tiny.shape == (1, 12, 14) and np.isfinite(np.asarray(tiny)).all()
    edge = losses.ms_gms_anomaly_map(jnp.asarray(x), jnp.asarray(y))
    assert not np.allclose(np.asarray(m), np.asarray(edge))


def _ssm(*args, code=0):
    """``ssm-jax ARGS`` in this process (what the console script calls); returns stderr."""
    import contextlib
    import io

    from ssm_jax.commands import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.run([str(a) for a in args])
    assert rc == code, err.getvalue()[-4000:]
    return err.getvalue()


NATIVE = ["--config.data.image_size=32", "--config.data.keep_aspect=True",
          "--config.data.crop_size=32", "--config.data.grayscale=True",
          "--config.model.width=4", "--config.train.batch_size=4", "--config.train.steps=3",
          "--config.mask.ks=(4,8)", "--config.eval.ks=(8,)", "--config.eval.batch_size=4",
          "--config.train.checkpoint_every=3", "--config.train.eval_every=3",
          "--config.data.val_fraction=0.3", "--config.eval.num_overlays=2",
          "--config.eval.map_normalization=val_zscore", "--config.eval.image_score_fusion=mse"]


def test_non_square_folder_end_to_end(wide_folder, tmp_path):
    wd = tmp_path / "wd"
    _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(wd),
         f"--config.data.path={wide_folder}", *NATIVE, "--evaluate")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["num_images"] == 8 and m["pixel_auroc"] is not None
    # The report draws each image at its own shape, padding cut off.
    shapes = {Image.open(p).size for p in (wd / "eval").glob("*_overlay.png")}
    assert shapes and shapes <= {(80, 32), (77, 32), (32, 72)}
    stats = np.load(wd / "map_stats.npz")
    assert "fusion" in stats and "mean" in stats
    out = tmp_path / "pred"
    _ssm("predict", "--workdir", str(wd), "--input", str(wide_folder / "test" / "hole"),
         "--output", str(out))
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 4 and all(np.isfinite(r["score"]) for r in rows)
    # Overlays keep each image's own aspect ratio (no padding drawn).
    with Image.open(out / "002_overlay.png") as im:  # a portrait 90 x 40 source image
        assert im.size == (32, 72)
    with Image.open(out / "001_overlay.png") as im:  # a landscape 40 x 96 source image
        assert im.size == (77, 32)


def test_crop_training_then_full_image_scoring_on_synthetic(tmp_path):
    wd = tmp_path / "wd"
    _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(wd),
         "--config.data.image_size=64", "--config.data.crop_size=32", "--config.model.width=4",
         "--config.train.batch_size=4", "--config.train.steps=3",
         "--config.data.synthetic_num_train=16", "--config.mask.ks=(4,8)",
         "--config.eval.ks=(8,)", "--config.train.checkpoint_every=3",
         "--config.train.eval_every=3", "--config.eval.num_overlays=1", "--evaluate")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["num_images"] > 0 and m["image_auroc"] is not None
    # The report shows whole 64 px images, not crops.
    with Image.open(next((wd / "eval").glob("*_overlay.png"))) as im:
        assert im.size == (64, 64)


def test_bad_native_settings_are_one_line_errors(tmp_path, wide_folder):
    err = _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "x"),
               f"--config.data.path={wide_folder}", "--config.data.keep_aspect=True", code=2)
    assert "crop_size" in err and "Traceback" not in err
    err = _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "y"),
               "--config.data.crop_size=24", code=2)
    assert "crop_size=24" in err and "Traceback" not in err


def test_shape_buckets_group_by_rounded_size():
    from ssm_jax.serving.detector import shape_buckets

    sizes = np.array([[32, 80], [32, 77], [72, 32], [32, 40]])
    groups = shape_buckets(sizes, (80, 80), 16)
    assert [g for g, _ in groups] == [(32, 48), (32, 80), (80, 32)]
    assert sorted(np.concatenate([i for _, i in groups]).tolist()) == [0, 1, 2, 3]
    assert folder.padded_shape([(32, 77), (72, 32)]) == (80, 80)


def test_mask_draws_average_independent_mask_sets():
    x = jnp.asarray(np.random.default_rng(6).uniform(size=(32, 32, 1)), jnp.float32)

    def restore(masked, m):
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        return (num / jnp.maximum(losses.gaussian_blur(m, 1.5), 1e-3))[..., None], m

    key, ones = jax.random.PRNGKey(2), jnp.ones((32, 32))
    two = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8),
                                                                           mask_draws=2))
    flat = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8, 4, 8)))
    np.testing.assert_allclose(np.asarray(two["raw"]), np.asarray(flat["raw"]) / 2, rtol=1e-5)
    one = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8)))
    assert not np.allclose(np.asarray(one["raw"]), np.asarray(two["raw"]))
    with pytest.raises(Exception, match="mask_draws"):
        scoring.ScoringConfig(mask_draws=0).validate(32)


def test_an_image_scores_the_same_alone_and_in_a_set():
    from ssm_jax.core import parallel
    from ssm_jax.serving.detector import content_ids, score_images

    mesh = parallel.data_mesh()

    def restore(masked, m):
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        return (num / jnp.maximum(losses.gaussian_blur(m, 1.5), 1e-3))[..., None], m

    sc = scoring.ScoringConfig(ks=(4, 8))

    def fn(variables, key, images, indices, sizes):
        return scoring.score_batch(restore, key, images, indices, sc, sizes)

    fn = jax.jit(fn)
    images = np.random.default_rng(7).uniform(size=(5, 32, 32, 1)).astype(np.float32)
    together = score_images(fn, {}, mesh, images, 4, seed=0)
    alone = score_images(fn, {}, mesh, images[3:4], 4, seed=0)
    assert float(alone["score"][0]) == pytest.approx(float(together["score"][3]), rel=1e-6)
    ids = content_ids(images)
    assert len(set(ids.tolist())) == 5 and content_ids(images[3:4])[0] == ids[3]
