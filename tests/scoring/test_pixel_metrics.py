"""The fixed-memory pixel metrics (PixelMetrics) against the exact ``metrics.compute_all``:
exactly equal when every distinct score is a threshold, within 1e-3 on real maps of both
shared data sets with the default thresholds, and the same totals batch by batch, merged,
on the device or in numpy."""

import os

import cli_runs
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.scoring import metrics
from ssm_jax.scoring import pixel_metrics as pxm

PixelMetrics, ThresholdSample = pxm.PixelMetrics, pxm.ThresholdSample

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
KEYS = ("pixel_auroc", "aupro", "pixel_f1_max")


def _exact(maps, masks, sizes=None):
    r = metrics.compute_all(np.zeros(len(maps)), np.zeros(len(maps)), masks, maps, sizes=sizes)
    return {k: r[k] for k in KEYS}


def _accumulate(pm, maps, masks, sizes=None, batch=3, device=False):
    for i in range(0, len(maps), batch):
        m = jnp.asarray(maps[i:i + batch]) if device else maps[i:i + batch]
        pm.update(m, masks[i:i + batch], None if sizes is None else sizes[i:i + batch])
    return pm


def _close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, (k, a[k], b[k])
        else:
            assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


def _blobs(n=10, h=24, w=20, seed=0, ties=None):
    """Maps with smooth bright blobs where the masks have their (several) regions."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(n, h, w)).astype(np.float32)
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(0, n, 2):  # every other image anomalous, two regions each
        masks[i, 2:6, 3:9] = 1
        masks[i, 12:19, 10:13] = 1
        maps[i][masks[i] > 0] += rng.uniform(0.5, 3.0)
    if ties is not None:
        maps = np.round(maps * ties) / ties
    return maps, masks


@pytest.mark.parametrize("device", [False, True])
@pytest.mark.parametrize("ties", [None, 2])
def test_every_distinct_score_a_threshold_is_exact(device, ties):
    """With a threshold at every distinct score the kept points are the exact curve's."""
    maps, masks = _blobs(ties=ties)
    if ties:
        assert np.unique(maps).size < 30  # heavy ties
    pm = _accumulate(PixelMetrics(np.unique(maps)), maps, masks, device=device)
    _close(pm.result(), _exact(maps, masks), 1e-6)


@pytest.mark.parametrize("device", [False, True])
def test_curve_points_count_scores_at_or_above_each_threshold(device):
    maps, masks = _blobs(ties=2)
    thr = np.unique(maps)[::3]  # some tie values only
    c = _accumulate(PixelMetrics(thr), maps, masks, device=device).curves()
    defect = masks > 0
    want_fps = [np.sum(~defect & (maps >= t)) for t in thr[::-1]]
    want_tps = [np.sum(defect & (maps >= t)) for t in thr[::-1]]
    np.testing.assert_array_equal(c["fps"][1:-1], want_fps)
    np.testing.assert_array_equal(c["tps"][1:-1], want_tps)
    assert c["fps"][0] == c["tps"][0] == 0
    assert (c["fps"][-1], c["tps"][-1]) == ((~defect).sum(), defect.sum())


@pytest.mark.parametrize("device", [False, True])
def test_sizes_and_padding_rows(device):
    maps, masks = _blobs(n=8)
    sizes = np.array([[24, 20], [20, 11], [17, 20], [24, 5]] * 2)
    valid = metrics_valid(maps.shape, sizes)
    maps[~valid] = 50.0  # padding: must count nowhere
    masks[~valid] = 1
    exact = _exact(maps, masks, sizes)
    thr = np.unique(maps[valid])
    pm = _accumulate(PixelMetrics(thr), maps, masks, sizes, device=device)
    _close(pm.result(), exact, 1e-6)
    # A padding row (size 0 x 0) of anything adds nothing.
    pm.update(np.full((1, 24, 20), 7.0, np.float32), np.ones((1, 24, 20)), [[0, 0]])
    _close(pm.result(), exact, 1e-6)
    assert pm.state["normal"].sum() + pm.state["defect"].sum() == valid.sum()


def metrics_valid(shape, sizes):
    from ssm_jax.data.folder import valid_masks

    return valid_masks(shape, sizes)


def test_empty_masks_and_all_normal_sets():
    maps, _ = _blobs()
    none = np.zeros(maps.shape, np.uint8)
    pm = _accumulate(PixelMetrics.from_normal_maps(maps), maps, none)
    assert pm.result() == _exact(maps, none) == dict.fromkeys(KEYS)
    # All defect: AUROC and AUPRO undefined (no normal pixel), F1-max is 1 at the lowest.
    full = np.ones(maps.shape, np.uint8)
    pm = _accumulate(PixelMetrics.from_normal_maps(maps), maps, full)
    assert pm.result() == _exact(maps, full)
    assert pm.result()["pixel_f1_max"] == 1.0 and pm.result()["aupro"] is None
    # Nothing added yet.
    assert PixelMetrics([0.0, 1.0]).result() == dict.fromkeys(KEYS)


def test_merge_and_summed_states_equal_one_pass():
    maps, masks = _blobs(n=12)
    thr = ThresholdSample()
    thr.add(maps[1::2])  # the normal images only
    one = _accumulate(PixelMetrics(thr.thresholds(512)), maps, masks, batch=5)
    a = _accumulate(PixelMetrics(one.thresholds), maps[:7], masks[:7], batch=2, device=True)
    b = _accumulate(PixelMetrics(one.thresholds), maps[7:], masks[7:], batch=4)
    summed = {k: a.state[k] + b.state[k] for k in a.state}
    for merged in (a.merge(b), PixelMetrics(one.thresholds, state=summed)):
        for k in ("normal", "defect", "regions", "nan"):
            np.testing.assert_array_equal(merged.state[k], one.state[k])
        np.testing.assert_allclose(merged.state["overlap"], one.state["overlap"], atol=1e-5)
        _close(merged.result(), one.result(), 1e-9)
    assert one.all_processes().result() == one.result()  # one process: itself
    assert int(one.state["regions"]) == 12  # 6 anomalous images, 2 regions each
    with pytest.raises(ValueError, match="different thresholds"):
        one.merge(PixelMetrics([0.0, 1.0]))
    with pytest.raises(ValueError, match="state 'normal' has shape"):
        PixelMetrics([0.0, 1.0], state=one.state)


# Each of 2 processes bins its half of one set (on its device), then all_processes().
_SET = """
rng = np.random.default_rng(7)
maps = rng.normal(size=(12, 16, 16)).astype(np.float32)
masks = np.zeros(maps.shape, np.uint8)
masks[::2, 3:8, 5:9] = 1
maps[masks > 0] += 1.5
"""
_TWO_PROCESSES = """
import sys, jax, numpy as np
from ssm_jax.runtime import distributed
from ssm_jax.scoring.pixel_metrics import PixelMetrics
distributed.maybe_initialize()
""" + _SET + """
i = jax.process_index()
pm = PixelMetrics(np.linspace(-2, 4, 50))
big = {k: np.zeros_like(v) for k, v in pm.state.items()}
big["normal"][0] = 3 * 2**31 + i  # beyond int32: the words must come through whole
pm.merge(PixelMetrics(pm.thresholds, state=big))
pm.update(jax.numpy.asarray(maps[i * 6:(i + 1) * 6]), masks[i * 6:(i + 1) * 6])
np.savez(f"{sys.argv[1]}{i}.npz", **pm.all_processes().state)
"""


@pytest.mark.slow
def test_all_processes_sums_every_process_exactly(tmp_path):
    from conftest import launch

    launch(2, 1, ["python", "-c", _TWO_PROCESSES, str(tmp_path / "state")], tmp_path / "proc")
    scope = {"np": np}
    exec(_SET, scope)
    one = _accumulate(PixelMetrics(np.linspace(-2, 4, 50)), scope["maps"], scope["masks"])
    want = one.state
    want["normal"][0] += 6 * 2**31 + 1
    for i in range(2):
        got = np.load(tmp_path / f"state{i}.npz")
        for k in ("normal", "defect", "regions", "nan"):
            np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_allclose(got["overlap"], want["overlap"], atol=1e-5)


def test_far_anomalies_keep_their_order():
    """Defects far above every calibration normal still give F1-max and AUPRO: the
    thresholds' upper tail orders them."""
    rng = np.random.default_rng(3)
    normals = rng.random((6, 32, 32)).astype(np.float32)
    maps, masks = _blobs(n=12, h=32, w=32, seed=4)
    maps = np.abs(maps) * 0.2
    for i in range(0, 12, 2):  # defects 10 to 1000x above the normals' range
        maps[i][masks[i] > 0] = 10.0 ** rng.uniform(1, 3, size=int(masks[i].sum()))
        maps[i, 0, :4] = 30.0  # some normal pixels among them: F1 < 1
    pm = _accumulate(PixelMetrics.from_normal_maps(normals), maps, masks)
    exact = _exact(maps, masks)
    assert exact["pixel_f1_max"] < 0.999
    _close(pm.result(), exact, 1e-3)


def test_nan_and_shape_errors():
    maps, masks = _blobs(n=2)
    maps[0, 0, 0] = np.nan
    for device in (False, True):
        pm = _accumulate(PixelMetrics([0.0, 1.0]), maps, masks, device=device)
        with pytest.raises(ValueError, match="NaN"):
            pm.result()
    with pytest.raises(ValueError, match="differ in shape"):
        PixelMetrics([0.0]).update(maps, masks[:, :3])
    with pytest.raises(ValueError, match="finite"):
        PixelMetrics([0.0, np.inf])
    with pytest.raises(ValueError, match="no finite pixel"):
        PixelMetrics.from_normal_maps(np.full((1, 4, 4), np.nan))


def test_threshold_sample_is_bounded_and_keeps_the_extremes():
    rng = np.random.default_rng(5)
    sample = ThresholdSample(max_pixels=1000)
    lo, hi = np.inf, -np.inf
    for _ in range(20):
        batch = rng.normal(size=(4, 16, 16)).astype(np.float32)
        lo, hi = min(lo, batch.min()), max(hi, batch.max())
        sample.add(batch, np.array([[16, 16], [8, 8], [16, 4], [0, 0]]))
        assert sample._count <= 1000
    thr = sample.thresholds(256)
    assert thr.dtype == np.float32 and np.all(np.diff(thr) > 0)
    assert sample.lo >= lo and sample.hi <= hi
    assert sample.lo in thr and sample.hi in thr
    assert thr[0] < sample.lo and thr[-1] > sample.hi * 1000  # open tails beyond both ends
    assert 200 <= thr.size <= 256
    # With masks, the defect pixels are left out: here all but the normal -1s.
    masked = ThresholdSample()
    masked.add(np.array([[[-1.0, 5.0], [9.0, -1.0]]]), masks=np.array([[[0, 1], [1, 0]]]))
    assert masked.lo == masked.hi == -1.0


def test_default_path_by_size():
    assert pxm.exact_is_cheap(256 * 128 * 128) and not pxm.exact_is_cheap(1000 * 128 * 128)
    limit = pxm.EXACT_MAX_PIXELS
    assert pxm.exact_is_cheap(limit) and not pxm.exact_is_cheap(limit + 1)


# --- Real maps: a tiny run trained on each shared set (the shared run's settings, so its
# compiled programs come from the session's cache), its test split scored. ---------------
@pytest.fixture(scope="module", params=["kolektor", "magnetic_tile"])
def real_maps(request, tmp_path_factory):
    from ssm_jax.data import load_dataset_for
    from ssm_jax.serving.detector import Detector

    root = os.path.join(REAL, request.param)
    if not os.path.isdir(root):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data set is missing: {root}")
        pytest.skip(f"no shared data ({root})")
    wd = tmp_path_factory.mktemp(request.param) / "wd"
    res = cli_runs.ssm(*cli_runs.train_args(wd, f"--config.data.path={root}",
                                            "--config.train.eval_every=100"))
    assert res.returncode == 0, res.stderr[-3000:]
    det = Detector.load(str(wd))
    data = load_dataset_for(det.cfg)
    val, test = data["val"], data["test"]
    return (det.score(val.images, val.sizes)["maps"], val.sizes,
            det.score(test.images, test.sizes)["maps"], test.masks, test.sizes)


@pytest.mark.slow
@pytest.mark.parametrize("standardized", [False, True])
def test_real_maps_agree_with_the_exact_metrics(real_maps, standardized):
    """|difference| <= 1e-3 for each metric (about 1e-5 measured) with the default
    thresholds placed on the validation normals' maps; the raw maps and the maps
    standardized per pixel by the normals (eval.map_normalization=val_zscore: unbounded)."""
    from ssm_jax.method import normalization

    val_maps, val_sizes, maps, masks, sizes = real_maps
    if standardized:
        stats = normalization.fit(val_maps, val_sizes)
        val_maps = normalization.standardize(val_maps, stats)
        maps = normalization.standardize(maps, stats)
    assert masks.any() and (~masks.astype(bool)).any()
    pm = PixelMetrics.from_normal_maps(val_maps, val_sizes)
    assert pm.thresholds.size > 0.95 * pxm.DEFAULT_THRESHOLDS
    _accumulate(pm, maps, masks, sizes, batch=8, device=True)
    exact = _exact(maps, masks, sizes)
    assert all(exact[k] is not None for k in KEYS)
    got = pm.result()
    print("|binned - exact|:", {k: f"{abs(got[k] - exact[k]):.1e}" for k in KEYS})  # -s
    _close(got, exact, 1e-3)
    # The numpy path bins the same pixels the same way.
    host = _accumulate(PixelMetrics(pm.thresholds), maps, masks, sizes, batch=8)
    for k in ("normal", "defect", "regions"):
        np.testing.assert_array_equal(host.state[k], pm.state[k])
