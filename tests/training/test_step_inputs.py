"""What the training step is fed (issue 44): uint8 batches train, validate and score as
their float32 [0, 1] copies did; BatchNorm statistics across devices without a second
pmean; ``model.batchnorm_sync``."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import device_flags

from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.core import parallel
from ssm_jax.core.errors import ConfigError
from ssm_jax.data.folder import unit_float
from ssm_jax.scoring import batch as batch_scoring
from ssm_jax.training import step as train_step

SMALL = ["data.image_size=32", "data.grayscale=true", "model.width=4", "train.batch_size=4",
         "mask.ks=(4,8)", "eval.ks=(8,)", "eval.batch_size=4"]


def _cfg(*overrides):
    return config_utils.apply_overrides(base_config(), [*SMALL, *overrides])


def test_uint8_batches_give_the_float_results():
    """Two training steps, the validation losses and the scores of uint8 batches equal
    those of their float32 [0, 1] copies (what the host sent before) to 1e-6."""
    cfg = _cfg()
    mesh = parallel.data_mesh()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 32, 32, 1), np.uint8) for _ in range(2)]
    step = train_step.make_train_step(cfg, mesh)
    out = {}
    for kind, convert in (("uint8", lambda b: b), ("float32", unit_float)):
        state = parallel.replicate(mesh, train_step.init_state(cfg, jax.random.PRNGKey(0)))
        losses = []
        for b in batches:
            state, m = step(state, parallel.global_batch(mesh, convert(b)))
            losses.append(float(m["loss"]))
        val = train_step.make_val_step(cfg, mesh)(
            state, parallel.global_batch(mesh, convert(batches[0])),
            parallel.global_batch(mesh, np.arange(4, dtype=np.int32)))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        score_fn = batch_scoring.make_score_fn(cfg, mesh, batch_scoring.scoring_config(cfg))
        scored = batch_scoring.score_images(score_fn, variables, mesh, convert(batches[1]),
                                            4, cfg.eval.seed)
        out[kind] = (losses, jax.tree.leaves(parallel.to_host(state.params)),
                     np.asarray(val), scored)
    (l8, p8, v8, s8), (lf, pf, vf, sf) = out["uint8"], out["float32"]
    assert l8[0] != l8[1]
    np.testing.assert_allclose(l8, lf, rtol=1e-6)
    for a, b in zip(p8, pf):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v8, vf, rtol=1e-6)
    for key in ("map", "score", "mse", "restored"):
        np.testing.assert_allclose(s8[key], sf[key], rtol=1e-6, atol=1e-6)
    assert s8["map"].std() > 0


def test_host_groups_and_bad_batchnorm_sync():
    assert train_step.host_groups([0, 0, 0, 0]) is None  # one host: the whole axis
    assert train_step.host_groups([0, 0, 1, 1]) == ((0, 1), (2, 3))
    assert train_step.host_groups([1, 0, 1, 0]) == ((0, 2), (1, 3))
    with pytest.raises(ConfigError, match="same number of devices"):
        train_step.host_groups([0, 0, 1])
    with pytest.raises(ConfigError, match="model.batchnorm_sync must be all, host or device"):
        config_utils.validate(_cfg("model.batchnorm_sync=global"))


# Run with 2 CPU devices: BatchNorm's statistics, and the step under each batchnorm_sync.
TWO_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.core import parallel
from ssm_jax.core.parallel import DATA_AXIS
from ssm_jax.training import step as train_step

assert jax.device_count() == 2
SMALL = json.loads(sys.argv[1])
cfg = config_utils.apply_overrides(base_config(), SMALL)
mesh = parallel.data_mesh()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (4, 32, 32, 1), np.uint8)
masks = (rng.random((4, 32, 32)) > 0.3).astype(np.float32)
init = train_step.init_state(cfg, jax.random.PRNGKey(0))
variables = {"params": init.params, "batch_stats": init.batch_stats}
out = {}

# 1. Flax's BatchNorm with axis_name: every device's updated running averages, side by
#    side (out_specs over the data axis): the same on both devices, so the pmean the step
#    applied to them before issue 44 was a no-op.
model = train_step.make_model(cfg, axis_name=DATA_AXIS)
def per_device(x, m):
    x = x.astype(jnp.float32) / 255.0
    _, upd = model.apply(variables, x * m[..., None], m, train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda a: a[None], upd["batch_stats"])
stats = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
                              out_specs=P(DATA_AXIS), check_vma=False))(images, masks)
leaves = [np.asarray(a) for a in jax.tree.leaves(stats)]
out["identical_on_devices"] = all(np.array_equal(a[0], a[1]) for a in leaves)
out["moved"] = max(float(np.abs(a[0] - b).max()) for a, b in
                   zip(leaves, jax.tree.leaves(init.batch_stats)))
# The one-device computation over the whole batch, for comparison.
one = train_step.make_model(cfg)
_, upd = jax.jit(lambda x, m: one.apply(variables, (x.astype(jnp.float32) / 255.0)
                                        * m[..., None], m, train=True,
                                        mutable=["batch_stats"]))(images, masks)
out["vs_one_device"] = max(float(np.abs(a[0] - np.asarray(b)).max())
                           for a, b in zip(leaves, jax.tree.leaves(upd["batch_stats"])))

# 2. Two steps under each batchnorm_sync: losses and BatchNorm running averages.
for sync in ("all", "host", "device"):
    c = config_utils.apply_overrides(cfg, [f"model.batchnorm_sync={sync}"])
    step = train_step.make_train_step(c, mesh)
    state = parallel.replicate(mesh, init)
    losses = []
    for i in range(2):
        state, m = step(state, parallel.global_batch(mesh, images[::-1] if i else images))
        losses.append(float(m["loss"]))
    out[sync] = {"losses": losses, "stats": [np.asarray(a).ravel().tolist() for a in
                                             jax.tree.leaves(state.batch_stats)]}
print("RESULT " + json.dumps(out))
"""


def test_batchnorm_statistics_on_two_devices():
    """On 2 devices, Flax's BatchNorm leaves the same running averages on both (so the
    step's pmean of them, removed in issue 44, changed nothing), equal to one device's
    over the whole batch; ``host`` on one host is ``all``, ``device`` differs."""
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=device_flags(2))
    res = subprocess.run([sys.executable, "-c", TWO_DEVICES, json.dumps(SMALL)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    assert out["identical_on_devices"] and out["moved"] > 1e-3
    assert out["vs_one_device"] < 1e-5
    assert out["host"] == out["all"]  # one process: the same program
    # Each device normalizes by its own rows' statistics: another loss from the first step.
    assert out["device"]["losses"][0] != out["all"]["losses"][0]
    diff = max(np.abs(np.subtract(a, b)).max() for a, b in
               zip(out["device"]["stats"], out["all"]["stats"]))
    assert diff > 1e-4  # per-device statistics: other running averages
