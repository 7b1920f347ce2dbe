"""The streamed scoring engine: images read from their files batch by batch score exactly as
the same images decoded into one array (and as one unbatched call of the scorer), masks and
validation files are those of the in-memory split, and uint8 batches score as float ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.core import parallel
from ssm_jax.data import folder, load_dataset, stream
from ssm_jax.data.synthetic import write_synthetic_folder
from ssm_jax.method import losses, scoring
from ssm_jax.scoring import streamed
from ssm_jax.scoring.batch import content_ids, score_images

SC = scoring.ScoringConfig(ks=(4, 8))


def _restore(masked, m):
    num = losses.gaussian_blur(masked[..., 0:1].mean(-1), 1.5)
    out = (num / jnp.maximum(losses.gaussian_blur(m, 1.5), 1e-3))[..., None]
    return jnp.repeat(out, masked.shape[-1], -1), m


@jax.jit
def _fn(variables, key, images, indices, sizes):
    return scoring.score_batch(_restore, key, images, indices, SC, sizes)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("streamed") / "set"
    write_synthetic_folder(r, image_size=32, grayscale=True, num_train=10, num_test_good=4,
                           num_test_anomalous=5, seed=11)
    return r


def test_streamed_files_score_as_the_array(root):
    mesh = parallel.data_mesh()
    data = load_dataset(str(root), 32, True, 0.2, 3)
    val, test = stream.streamed_eval_split(str(root), 32, True, 0.2, 3)
    assert isinstance(test.images, stream.ImageFiles) and len(test) == 9
    assert val.paths == data["val"].paths and test.paths == data["test"].paths
    np.testing.assert_array_equal(test.labels, data["test"].labels)
    np.testing.assert_array_equal(np.stack([test.masks[i] for i in range(9)]),
                                  data["test"].masks)
    mem = score_images(_fn, {}, mesh, data["test"].images, 4, 0)
    batches = list(streamed.score_batches(_fn, {}, mesh, test.images, 4, 0,
                                          np.tile([32, 32], (9, 1)), masks=test.masks))
    assert [len(b.index) for b in batches] == [4, 4, 1]  # the last batch's padding dropped
    got = streamed.collect(iter(batches), 9, (32, 32), 1, restored=False)
    np.testing.assert_allclose(got["score"], mem["score"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["map"], mem["map"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.concatenate([b.mask for b in batches]),
                                  data["test"].masks[np.concatenate([b.index for b in batches])])
    assert all(b.restored is None for b in batches)  # not fetched unless asked
    # One unbatched call of the scorer on the whole array: the engine's batching (padding,
    # order, dispatch ahead) changes nothing.
    x = data["test"].images
    sizes = np.tile(np.int32([32, 32]), (9, 1))
    ref = _fn({}, jax.random.PRNGKey(0), x, content_ids(x), sizes)
    np.testing.assert_allclose(got["score"], np.asarray(ref["score"]), rtol=1e-6, atol=1e-7)
    assert np.ptp(got["score"]) > 0


def test_restorations_only_for_the_rows_asked(root):
    mesh = parallel.data_mesh()
    _, test = stream.streamed_eval_split(str(root), 32, True, 0.2, 3)
    want = np.zeros(9, bool)
    want[[5]] = True
    batches = list(streamed.score_batches(_fn, {}, mesh, test.images, 4, 0,
                                          np.tile([32, 32], (9, 1)),
                                          restored=lambda idx: want[idx]))
    assert [b.restored is not None for b in batches] == [False, True, False]
    skip = np.zeros(9, bool)
    skip[:6] = True  # a resumed run: only the rest is scored, with the same results
    rest = list(streamed.score_batches(_fn, {}, mesh, test.images, 4, 0,
                                       np.tile([32, 32], (9, 1)), skip=skip))
    assert np.concatenate([b.index for b in rest]).tolist() == [6, 7, 8]
    full = {int(i): s for b in batches for i, s in zip(b.index, b.score)}
    assert [full[int(i)] for i in rest[0].index] == pytest.approx(rest[0].score.tolist(),
                                                                  rel=1e-6)


def test_padded_shapes_in_buckets_score_as_the_array(wide_folder):
    mesh = parallel.data_mesh()
    data = load_dataset(str(wide_folder), 32, True, 0.25, 0, keep_aspect=True)
    _, test = stream.streamed_eval_split(str(wide_folder), 32, True, 0.25, 0, keep_aspect=True)
    np.testing.assert_array_equal(test.sizes, data["test"].sizes)
    assert test.images.shape == data["test"].images.shape[1:3]
    mem = score_images(_fn, {}, mesh, data["test"].images, 2, 0, sizes=data["test"].sizes,
                       bucket=16)
    got = streamed.collect(streamed.score_batches(_fn, {}, mesh, test.images, 2, 0,
                                                  test.sizes, 16, restored=True),
                           len(test), test.images.shape, 1)
    for k in ("score", "map", "restored"):
        np.testing.assert_allclose(got[k], mem[k], rtol=1e-6, atol=1e-7)


def test_uint8_batches_score_as_float(root):
    mesh = parallel.data_mesh()
    x8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    a = score_images(_fn, {}, mesh, x8, 2, 0)
    b = score_images(_fn, {}, mesh, x8.astype(np.float32) / 255.0, 2, 0)
    np.testing.assert_array_equal(a["score"], b["score"])


def test_files_for_pads_like_load_images(wide_folder):
    paths = folder.list_images(str(wide_folder / "test" / "hole"))
    src = stream.files_for(paths, 32, True, keep_aspect=True)
    images, sizes = folder.load_images(paths, 32, True, keep_aspect=True)
    np.testing.assert_array_equal(src[np.arange(len(paths))], images)
    np.testing.assert_array_equal(src.sizes, sizes)
