"""One process of a two-process jaxdec run (`jax.distributed` on this machine's CPU, gloo
collectives), as on a multi-host TPU pod or GPU cluster: test_multiprocess.py starts two.

    python multiprocess_worker.py PROCESS_ID PORT CHECKPOINT EXPORT_DIR OUT_JSON

Each process holds two CPU devices; the model's mesh (tp = 2 within a process, dp = 2 across
the two; tp = 4 for a PrefixCache) spans both. The results (tokens of every method, stream
calls) go to OUT_JSON.
"""

import json
import os
import sys

process_id, port, checkpoint, export_dir, out = sys.argv[1:]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))

import jaxdec  # noqa: E402
from multiprocess_cases import PROMPTS, prefix_turns, run_cases  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
mesh = jaxdec.make_mesh(tp=2, dp=2)
local = jaxdec.make_mesh()  # this process's own first device
assert {d.process_index for d in mesh.devices.flat} == {0, 1}
assert local.devices.flat[0].process_index == jax.process_index()

model = jaxdec.load_pretrained(checkpoint, mesh=mesh)
draft = jaxdec.load_pretrained(checkpoint, mesh=local)  # moved onto the target's mesh
results = run_cases(model, draft)
# One row (PrefixCache's): tensor parallelism alone over both processes.
results["prefix_turns"] = prefix_turns(jaxdec.load_pretrained(checkpoint,
                                                              mesh=jaxdec.make_mesh(tp=4)))
calls = []
jaxdec.generate(model, PROMPTS, max_new_tokens=4, stream=lambda *args: calls.append(1))
results["stream_calls"] = len(calls)
jaxdec.save_pretrained(model, export_dir, overwrite=True)
results["export_listed"] = sorted(os.listdir(export_dir)) if jax.process_index() == 0 else None

# Process 0 refusing (an existing directory) or failing midway (a full disk) raises there and
# a RuntimeError in process 1, which waited for it in a gather before.
failures = []
try:
    jaxdec.save_pretrained(model, export_dir)
except Exception as e:  # noqa: BLE001 (what each process raised is the result)
    failures.append(type(e).__name__)
if jax.process_index() == 0:
    import jaxdec.checkpoint

    written = []

    def full_disk(path, tensors, fetch):
        if written:
            raise OSError("No space left on device")
        written.append(path)
        real_write(path, tensors, fetch)

    real_write, jaxdec.checkpoint._write_safetensors = (jaxdec.checkpoint._write_safetensors,
                                                        full_disk)
try:
    jaxdec.save_pretrained(model, export_dir, overwrite=True, max_shard_bytes=50_000)
except Exception as e:  # noqa: BLE001
    failures.append(type(e).__name__)
results["export_failures"] = failures
results["export_listed_after_failures"] = (sorted(os.listdir(export_dir))
                                           if jax.process_index() == 0 else None)
with open(out, "w") as f:
    json.dump(results, f)
