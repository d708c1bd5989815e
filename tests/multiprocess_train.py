"""One process of a two-process training run (`jax.distributed` on this machine's CPU, gloo
collectives), as on a multi-host TPU slice: test_multiprocess.py starts two.

    python multiprocess_train.py PROCESS_ID PORT RUN_DIR OUT_JSON

Each process holds two CPU devices; the data-parallel mesh (dp = 4) spans both. A target is
trained, a draft distilled from it, the target resumed from its next-to-last checkpoint, and
its directory asked for again without --resume / --force (an error in process 0, which both
processes must raise). The metrics, log lines and errors go to OUT_JSON.
"""

import json
import os
import shutil
import sys

process_id, port, run_dir, out = sys.argv[1:]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))

from jax.experimental import multihost_utils  # noqa: E402

from jaxdec.train import train_draft, train_lm  # noqa: E402
from train_presets import MICRO  # noqa: E402

lines = []
target = os.path.join(run_dir, "lm")
results = {"lm": train_lm(MICRO, target, dp=4, log=lines.append)}
results["draft"] = train_draft(target, MICRO, os.path.join(run_dir, "draft"), dp=4,
                               log=lines.append)
# The target's last checkpoint lost (a kill during its save, before metrics.json, written
# last): --resume continues from the one before, to the same weights.
if jax.process_index() == 0:
    shutil.rmtree(os.path.join(target, "checkpoints", str(MICRO.target_steps)))
    os.remove(os.path.join(target, "metrics.json"))
multihost_utils.sync_global_devices("checkpoint removed")
results["resumed"] = train_lm(MICRO, target, dp=4, resume=True, log=lines.append)
try:
    train_lm(MICRO, target, dp=4, log=lines.append)
except Exception as e:  # noqa: BLE001
    results["again"] = f"{type(e).__name__}: {e}"
results["lines"] = lines
with open(out, "w") as f:
    json.dump(results, f)
