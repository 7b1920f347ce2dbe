"""The convolution forms of ssm_jax.method.conv_forms equal the plain convolutions they replace:
outputs, input gradients and kernel gradients, alone and inside the U-Net; the model's
parameter tree (what a checkpoint holds) is unchanged; groups of models give the same
result whether they run vmapped or one after another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ssm_jax.core import parallel
from ssm_jax.method import conv_forms
from ssm_jax.method.model import SSMUNet
from ssm_jax.training import groups as multi_model

DN = ("NHWC", "HWIO", "NHWC")


def _plain(x, k, stride, pad):
    return lax.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=DN)


def _check_equal(form, x, k, stride, pad, tol=1e-5):
    def loss(conv, x, k):
        y = conv(x, k, (stride, stride), pad, dimension_numbers=DN)
        return jnp.sum(jnp.sin(y)), y

    (la, ya), ga = jax.value_and_grad(lambda x, k: loss(form, x, k), (0, 1), has_aux=True)(x, k)
    (lb, yb), gb = jax.value_and_grad(
        lambda x, k: loss(lax.conv_general_dilated, x, k), (0, 1), has_aux=True)(x, k)
    assert ya.shape == yb.shape
    np.testing.assert_allclose(ya, yb, rtol=tol, atol=tol)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("size", [(16, 16), (15, 10), (8, 9)])
@pytest.mark.parametrize("kernel,pad", [(4, 1), (2, 0), (4, 2)])
def test_space_to_depth_equals_strided_conv(size, kernel, pad, monkeypatch):
    monkeypatch.setattr(conv_forms, "ENABLED", {"space_to_depth"})
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, *size, 3))
    k = jax.random.normal(jax.random.fold_in(key, 1), (kernel, kernel, 3, 5))
    _check_equal(conv_forms.space_to_depth_conv, x, k, 2, ((pad, pad), (pad, pad)))
    # The form really is another program: no stride-2 convolution left in it.
    text = jax.jit(lambda x, k: conv_forms.space_to_depth_conv(
        x, k, (2, 2), ((pad, pad), (pad, pad)), dimension_numbers=DN)).lower(x, k).as_text()
    assert "window_strides = array<i64: 2, 2>" not in text


def test_padded_out_and_split_input_equal_plain_conv():
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (2, 12, 12, 9))
    k = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 9, 4))
    _check_equal(conv_forms.padded_out_conv, x, k, 1, ((1, 1), (1, 1)))
    _check_equal(conv_forms.split_input_conv(1), x, k, 1, ((1, 1), (1, 1)))
    padded = jax.jit(lambda x, k: conv_forms.padded_out_conv(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)).lower(x, k).as_text()
    assert "tensor<2x12x12x8xf32>" in padded  # the convolution computes 8 channels


def _model_loss_and_grads(net, variables, x, m):
    def loss(params):
        (r, pm), _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               x, m, train=True, mutable=["batch_stats"])
        return jnp.mean((r - x) ** 2) + jnp.mean(pm)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_model_with_forms_equals_plain_model(channels, monkeypatch):
    monkeypatch.setattr(conv_forms, "ENABLED", {"space_to_depth", "padded_out", "split_input"})
    net = SSMUNet(channels=channels, width=4)
    key = jax.random.PRNGKey(2)
    x = jax.random.uniform(key, (2, 32, 32, channels))
    m = (jax.random.uniform(jax.random.fold_in(key, 1), (2, 32, 32)) > 0.5).astype(jnp.float32)
    variables = net.init(key, x, m)
    loss_new, grads_new = _model_loss_and_grads(net, variables, x, m)
    monkeypatch.setattr(conv_forms, "ENABLED", set())
    plain = SSMUNet(channels=channels, width=4)
    # The parameter tree a checkpoint holds is the plain model's, leaf for leaf.
    plain_vars = plain.init(key, x, m)
    assert jax.tree.structure(plain_vars) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(plain_vars), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    loss_old, grads_old = _model_loss_and_grads(plain, variables, x, m)
    np.testing.assert_allclose(loss_new, loss_old, rtol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(grads_new)[0],
                          jax.tree.leaves(grads_new), jax.tree.leaves(grads_old)):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-3)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, jax.tree_util.keystr(path[0])


@pytest.mark.parametrize("mode", ["unroll", "vmap"])
def test_group_modes_agree(mode, monkeypatch):
    mesh = parallel.data_mesh()
    ws = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 2, 4))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 2))

    def fn(w, i):
        return _plain(x, w, 1, "SAME") * (i + 1)

    want = jnp.stack([fn(ws[i], i) for i in range(3)])
    monkeypatch.setitem(multi_model.GROUP_MAP, mesh.devices.flat[0].platform, mode)
    assert multi_model.group_mode(mesh) == mode
    got = jax.jit(lambda ws, idx: multi_model.over_models(fn, mesh, ws, idx))(
        ws, jnp.arange(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    text = jax.jit(lambda ws, idx: multi_model.over_models(fn, mesh, ws, idx)).lower(
        ws, jnp.arange(3)).as_text()
    # Unrolled: one plain convolution per model; vmapped: one grouped convolution.
    assert text.count("stablehlo.convolution") == (3 if mode == "unroll" else 1)
