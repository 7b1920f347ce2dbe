"""Two training steps on a fixed global batch; saves params (.npy) and losses (.json).

Shared by test_parallel (1 vs 4 devices) and test_multihost (2 processes vs 1); run as
`python -c SCRIPT OUT.npy`.
"""

SCRIPT = r"""
import json, sys
import jax, numpy as np
from ssm_jax import config_utils, distributed, parallel, train_step
from ssm_jax.config_base import base_config
distributed.maybe_initialize()
cfg = config_utils.apply_overrides(base_config(), [
    "data.image_size=32", "data.grayscale=true", "model.width=4", "train.batch_size=8",
    "train.steps=10", "mask.ks=(4,8)"])
mesh = parallel.data_mesh()
state = parallel.replicate(mesh, train_step.init_state(cfg, jax.random.PRNGKey(0)))
step = train_step.make_train_step(cfg, mesh)
rng = np.random.default_rng(0)
losses = []
for i in range(2):
    batch = rng.random((8, 32, 32, 1), dtype=np.float32)  # same global batch everywhere
    state, m = step(state, parallel.global_batch(mesh, parallel.host_rows(batch)))
    losses.append(float(parallel.to_host(m)["loss"]))
host = parallel.to_host(state)
if jax.process_index() == 0:
    leaves = jax.tree.leaves(host.params) + jax.tree.leaves(host.batch_stats)
    np.save(sys.argv[1], np.concatenate([np.ravel(x) for x in leaves]))
    with open(sys.argv[1] + ".json", "w") as f:
        json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                   "losses": losses}, f)
"""
