"""The U-Net: shapes, ranges, widths, channels, mask conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.method.model import SSMUNet


# Each case compiles the network three times; two cases cover both channel counts and
# both widths (the shapes checked depend on each alone).
@pytest.mark.parametrize("channels,width", [(1, 4), (3, 8)])
def test_output_shapes_and_ranges(channels, width):
    net = SSMUNet(channels=channels, width=width)
    k = jax.random.PRNGKey(0)
    x = jax.random.uniform(k, (2, 32, 32, channels))
    m = (jax.random.uniform(k, (2, 32, 32)) > 0.3).astype(jnp.float32)
    variables = jax.jit(lambda k: net.init(k, x, m, train=False))(k)
    (rest, pred), upd = jax.jit(lambda v: net.apply(v, x, m, train=True,
                                                    mutable=["batch_stats"]))(variables)
    assert rest.shape == (2, 32, 32, channels) and pred.shape == (2, 32, 32)
    for a in (rest, pred):
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # Encoder widths w, 2w, 4w, 8w, 8w: the deepest conv kernel is 8w -> 8w.
    kernels = [v.shape for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "kernel" in jax.tree_util.keystr(path)]
    assert (3, 3, 8 * width, 8 * width) in kernels
    assert max(s[-1] for s in kernels) == 8 * width
    # Eval mode uses running statistics and differs from train mode.
    rest_eval, _ = jax.jit(lambda v: net.apply(v, x, m, train=False))(variables)
    assert not np.allclose(rest_eval, rest)


def test_mask_changes_output():
    net = SSMUNet(channels=1, width=4)
    k = jax.random.PRNGKey(1)
    x = jax.random.uniform(k, (1, 32, 32, 1))
    m1 = jnp.ones((1, 32, 32))
    m2 = m1.at[:, 8:16, 8:16].set(0.0)
    v = jax.jit(lambda k: net.init(k, x, m1))(k)
    apply = jax.jit(lambda v, m: net.apply(v, x, m))
    a, _ = apply(v, m1)
    b, _ = apply(v, m2)
    assert not np.allclose(a, b)


def test_bfloat16_compute_keeps_float32_params():
    net = SSMUNet(channels=3, width=4, dtype=jnp.bfloat16)
    k = jax.random.PRNGKey(2)
    x = jax.random.uniform(k, (1, 16, 16, 3))
    v = jax.jit(lambda k: net.init(k, x, jnp.ones((1, 16, 16))))(k)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
    rest, pred = jax.jit(lambda v: net.apply(v, x, jnp.ones((1, 16, 16))))(v)
    assert rest.dtype == jnp.float32 and rest.shape == (1, 16, 16, 3)


def test_rejects_wrong_channels():
    net = SSMUNet(channels=3, width=4)
    with pytest.raises(ValueError, match="expected"):
        net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.ones((1, 16, 16)))


def test_nearest_resizing_without_a_gather_is_the_gather():
    """Upsampling by repeat and mask downsampling by strided slicing give exactly what
    jax.image.resize(..., "nearest") gives (other factors fall back to it)."""
    from ssm_jax.method import model

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
    for out in ((8, 12), (16, 6), (10, 12)):
        ref = jax.image.resize(x, (2, *out, 3), method="nearest")
        np.testing.assert_array_equal(model.upsample_nearest(x, *out), ref)
    m = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 1))
    for out in ((16, 16), (8, 8), (4, 2), (1, 1), (12, 32)):
        ref = jax.image.resize(m, (2, *out, 1), method="nearest")
        np.testing.assert_array_equal(model.downsample_nearest(m, *out), ref)


def test_network_unchanged_by_resizing_without_a_gather(monkeypatch):
    """The U-Net's forward pass is bit-identical to the gather form's (issue 44), its
    parameter gradients equal to 1e-6 of each leaf's largest (summed in another order: 3e-7
    measured here; with train-mode BatchNorm, whose batch statistics amplify that, 3e-6
    at 32 px)."""
    from ssm_jax.method import model

    net = SSMUNet(channels=1, width=4)
    k = jax.random.PRNGKey(3)
    x = jax.random.uniform(k, (2, 16, 16, 1))
    m = (jax.random.uniform(jax.random.fold_in(k, 1), (2, 16, 16)) > 0.3).astype(jnp.float32)
    variables = jax.jit(lambda k: net.init(k, x, m, train=False))(k)
    weights = jax.random.normal(jax.random.fold_in(k, 2), (2, 16, 16, 1))

    def run():
        def loss(params):
            rest, pred = net.apply({**variables, "params": params}, x, m, train=False)
            return jnp.sum(rest * weights) + jnp.sum(pred * weights[..., 0]), rest
        (_, rest), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables["params"])
        return np.asarray(rest), [np.asarray(g) for g in jax.tree.leaves(grads)]

    rest, grads = run()
    monkeypatch.setattr(model, "upsample_nearest", lambda h, oh, ow: jax.image.resize(
        h, (h.shape[0], oh, ow, h.shape[3]), method="nearest"))
    monkeypatch.setattr(model, "downsample_nearest", lambda a, oh, ow: jax.image.resize(
        a, (a.shape[0], oh, ow, a.shape[3]), method="nearest"))
    rest_gather, grads_gather = run()
    np.testing.assert_array_equal(rest, rest_gather)
    assert max(np.abs(g).max() for g in grads) > 1.0  # the gradients are not all ~0
    for g, h in zip(grads, grads_gather):
        np.testing.assert_allclose(g, h, rtol=0, atol=1e-6 * np.abs(g).max())
