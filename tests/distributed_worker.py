"""One process of the multi-process training test (tests/test_distributed.py); not collected by pytest.

    python tests/distributed_worker.py WORKDIR MESH_JSON [LOCAL_DEVICES [PREPARED_DIR]]

Reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set (multi-process run) and
trains the micro config of tests/test_train.py on the given mesh; with PREPARED_DIR, from that prepared
corpus, printing which global batch positions this process read (`reads`: first position of the batch ->
positions read).
"""
import importlib.util
import json
import os
import sys

workdir, mesh = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testenv import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(devices=int(sys.argv[3]) if len(sys.argv) > 3 else 2)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
from dsv3_jax import distributed  # noqa: E402

distributed.initialize()  # from the environment; a no-op for one process
from dsv3_jax.train import loop  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("test_train", os.path.join(here, "test_train.py"))
test_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(test_train)
config = test_train.micro_config(steps=8, train__log_every=2, train__eval_every=4)
for k, v in mesh.items():
    config.mesh[k] = v
reads = {}
if len(sys.argv) > 4:
    import numpy as np

    from dsv3_jax.data import loader

    config.data.path, config.model.vocab_size = sys.argv[4], 640
    rows = loader.LazyRows.rows

    def logged_rows(self, which):
        picked = np.atleast_1d(self.positions[which]).tolist()
        reads.setdefault(int(self.positions[0]), set()).update(picked)
        return rows(self, which)

    loader.LazyRows.rows = logged_rows
result = loop.train(config, workdir, quiet=True)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                  "losses": [r["loss"] for r in result.history], "reads": {k: sorted(v) for k, v in reads.items()}}))
