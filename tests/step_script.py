"""Two data-parallel training steps on a fixed global batch; saves what they changed.

Shared by test_parallel (1 vs 4 devices) and test_multihost (2 processes vs 1), which
compare the outputs of :func:`two_steps` run with different device/process counts. Run
in-process (``two_steps(path)``) or in a subprocess (``python -c SCRIPT path [ssm-jax
ARGS]``): a subprocess may go on with one ``ssm-jax`` command (``cli.run``) in the same
process, so that one launch of the multi-process runtime serves two tests.

The optimizer is swapped for plain SGD: Adam normalizes each gradient by its running
magnitude, so a gradient reduced with the wrong scale (a psum instead of a pmean) or not
reduced at all moves the parameters by about the same lr-sized step and could pass a
parameter check. With SGD the parameter change is lr times the summed gradients, so the
check compares the reduced gradients themselves.
"""

import json
import os

import numpy as np

LR = 0.05
SCRIPT = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
          "from step_script import main; main(sys.argv[1:])")


def main(argv: list[str]) -> None:
    """``two_steps(argv[0])``, then ``ssm-jax argv[1:]`` (if given) in this process."""
    import sys

    two_steps(argv[0])
    if len(argv) > 1:
        from ssm_jax.commands import cli
        from ssm_jax.runtime import distributed

        # jax.distributed is initialized once per process, and two_steps did it.
        distributed.maybe_initialize = lambda: False
        sys.exit(cli.run(argv[1:]))


def two_steps(out: str) -> None:
    """Saves ``out`` (parameter change + BatchNorm statistics, flat) and ``out.json``."""
    import jax
    import optax

    from ssm_jax.config import loader as config_utils
    from ssm_jax.config.defaults import base_config
    from ssm_jax.core import parallel
    from ssm_jax.runtime import distributed
    from ssm_jax.training import step as train_step

    distributed.maybe_initialize()
    cfg = config_utils.apply_overrides(base_config(), [
        "data.image_size=32", "data.grayscale=true", "model.width=4", "train.batch_size=8",
        # No MS-GMS term: its gradient at flat pixels (|grad| ~ 0) points wherever float
        # noise says, which makes 1e-2-relative differences between device counts.
        "train.steps=10", "mask.ks=(4,8)", "loss.gms_weight=0.0"])
    make_optimizer = train_step.make_optimizer
    train_step.make_optimizer = lambda *args, **kwargs: optax.sgd(LR)
    try:
        mesh = parallel.data_mesh()
        init = train_step.init_state(cfg, jax.random.PRNGKey(0))
        start = [np.asarray(x) for x in jax.tree.leaves(init.params)]
        state = parallel.replicate(mesh, init)
        step = train_step.make_train_step(cfg, mesh)
    finally:
        train_step.make_optimizer = make_optimizer
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = rng.random((8, 32, 32, 1), dtype=np.float32)  # same global batch everywhere
        state, m = step(state, parallel.global_batch(mesh, parallel.host_rows(batch)))
        losses.append(float(parallel.to_host(m)["loss"]))
    host = parallel.to_host(state)
    if jax.process_index() == 0:
        delta = [np.ravel(p - s) for p, s in zip(jax.tree.leaves(host.params), start)]
        stats = [np.ravel(x) for x in jax.tree.leaves(host.batch_stats)]
        np.save(out, np.concatenate(delta + stats))
        with open(out + ".json", "w") as f:
            json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                       "num_delta": int(sum(d.size for d in delta)), "losses": losses}, f)


def load(out: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(info, parameter change, BatchNorm statistics) saved by :func:`two_steps`."""
    with open(out + ".json") as f:
        info = json.load(f)
    flat = np.load(out)
    return info, flat[:info["num_delta"]], flat[info["num_delta"]:]


def assert_same_steps(a: str, b: str) -> None:
    """Same losses, same gradient-driven parameter change, same BatchNorm statistics."""
    ia, da, sa = load(a)
    ib, db, sb = load(b)
    np.testing.assert_allclose(ia["losses"], ib["losses"], rtol=1e-5, atol=1e-6)
    assert ia["losses"][0] != ia["losses"][1]
    scale = np.abs(da).max()
    assert scale > 1e-3  # the steps moved the parameters
    err = np.abs(da - db).max()
    print(f"max |param change| {scale:.3g}, max difference {err:.3g}")
    # float32 reduction order differs between device counts (measured: ~1e-4 of the
    # largest change). A wrongly scaled or missing gradient reduction changes it by O(1).
    assert err <= 1e-3 * scale, (err, scale)
    np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)
