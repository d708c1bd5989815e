"""Tree-verification attention: the Pallas kernel against the XLA reference and the roofline.

Usage (on the lent GPU machine, one call; results land in $OUT):

    python3 -m pip install --no-deps --no-build-isolation -e . && \\
        python3 bench/kernels.py --preset h100 --out $OUT

and on a CPU (the kernel interpreted; checks the script, not speed):
`python3 bench/kernels.py --preset cpu-tiny --out /tmp/bench`. Writes `kernels-<device>.json`
(one record per impl and case) and `kernels-<device>.md` to `--out` (default bench/results/).

Cases (the h100 preset): Llama-3-8B attention heads (32 query, 8 KV, head dim 128), bf16,
batch 1 and 8, `context` cached tokens per row (1K, 4K, 16K, 64K) and T = 1 (decode), 16 and
64 new tokens under a random tree mask (positions = context + depth). The cache has
context + T slots, so the reference (which scores every slot) does no extra work.

Timing: each impl runs `--inner` rounds inside one jitted `fori_loop`, a round calling it once
on each of the case's cache copies (`kv_copies`: as many as make a round read ~100 MB, twice
the L2, up to 8, so the keys and values come from HBM as they do in decoding rather than from
a warm L2; small caches may still partly hit), each call's queries depending on the previous
call's output through a scalar (nothing is hoisted); the best of `--trials` such loops
divided by its calls is the time per call, launch overhead included, compile excluded. The
Pallas path's time covers its whole op (packing, kernel, combine). Every case's programs
compile first, side by side in `--compile-ahead` threads (on by default on an accelerator),
and nothing is timed until they are done; records carry `compile_ahead_s` and
`first_call_compiles` (0 when the program was compiled ahead).

Hopper: on a Hopper GPU the h100 preset also times `Impl.MOSAIC_GPU` (impl `hopper`, the
Mosaic GPU kernel of `pallas_kernels/tree_attention/hopper.py`: TMA-fed warpgroups, wgmma) on
the cases it takes (T >= 16 in bf16); the table adds its columns and the goal lines judge each
case by its faster kernel.

Tilings: where the goals are hardest (the h100 preset: T = 16 and 64 at contexts 4K and 64K)
the kernel is also timed with a few other `BlockSizes` (fields over the case's default:
bigger key blocks, bigger row tiles with more warps, a shallower and a deeper pipeline), and
decode (T = 1 at 1K and 4K) with twice the default split count and with 4 and 16 splits,
so one device call also says which tiling the defaults should take;
the pallas record keeps them as `sweep` and the Markdown tables them. The main table is
always the default tiling. Records carry `kernel_sources` (a hash of the kernels' code), so
the device plan measures changed kernels again.

Profiles: a few cases (`profile_cases`) run their timed loop once more under the JAX profiler;
the record's `profile` sums the device's kernel time by kernel name (`calls` = the loop's
calls, so the Markdown can say per call how much was the Pallas kernel and how much the
packing and combine around it). Never the timing.

Roofline, with both ceilings measured in the same run:
    bytes  = K and V of the context + T slots (2 * B * (context + T) * K * D * 2)
             + queries and outputs (2 * B * T * H * D * 2)
    flops  = 4 * B * T * H * (context + T) * D          (Q K^T and P V)
    roofline_us  = max(bytes / hbm_bandwidth, flops / matmul_peak)
    hbm_fraction = bytes / time / hbm_bandwidth
HBM bandwidth: the better of `bench.common.measure_hbm`'s probes over a 1 GiB array (`x + 1`,
read + write, and a read-only `sum`, each timed per pass inside one jitted loop, so dispatch
and synchronization drop out; records carry both as `hbm_probes`); matmul peak: 8192^3
products on random data (in the preset's dtype), timed per product the same way
(`measure_matmul_peak`).

Call floors (`call_floor_us`, measured in the same run and the same timed loop): what a call
that does almost nothing costs there, a one-block Pallas kernel and one XLA fusion. Where a
case's roofline is below its floor (small caches), no kernel reaches the roofline; the goal
line names the worst case's floor beside its roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    HBM_METHOD, RESULTS, CompileAhead, counting_compiles, default_compile_workers, device_slug,
    git_commit, measure_hbm, newest, out_dir, profile_kernels, runs_note, sources_digest, utc_now,
    versions, write_merged)

PRESETS = {
    "h100": dict(batches=(1, 8), contexts=(1024, 4096, 16384, 65536), queries=(1, 16, 64),
                 heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", inner=20, trials=5,
                 hbm_bytes=1 << 30, matmul_size=8192, interpret=False,
                 # The Hopper (Mosaic GPU) kernel beside the Triton one, where it takes the
                 # case (T >= 16 in bf16) and the device is a Hopper.
                 hopper=True,
                 rotate_bytes=100 << 20, max_copies=8,  # twice the H100/H200's 50 MB L2
                 # The Hopper kernel's other tilings (its shared memory holds 3 stages of
                 # 64-slot blocks at most with head dim 128): a shallower ring, more splits,
                 # the probabilities kept in registers, the two compute warpgroups
                 # alternating on the tensor cores.
                 hopper_sweeps=(dict(queries=(16, 64), contexts=(4096, 65536),
                                     tilings=(dict(num_stages=2), dict(split_factor=2),
                                              # Hopper's register-operand wgmma (untested
                                              # by the interpreter)
                                              dict(probs_in_registers=True))),
                                # two compute warpgroups (T = 16 has one)
                                dict(queries=(64,), contexts=(4096, 65536),
                                     tilings=(dict(pingpong=True),
                                              dict(pingpong=True, probs_in_registers=True)))),
                 # Other GPU tilings timed beside the default: where the goals are hardest,
                 # and (decode) other split counts around the default (4 at 1K, 16 at 4K since
                 # the 4-block floor of the 2026-11-27 H200 run, where 4 and 16 splits beat
                 # the 17 and 33 of the wave-fill rule alone, when the combine still read
                 # the splits one after another): twice and four times the default's
                 # (`split_factor`; at 4K one key block a split), 2, 8 and 16, and deeper
                 # pipelines (a split's few blocks in flight at once).
                 # (Fields over the case's default tiling: at T = 16 and 64 three pipeline
                 # stages since the 2026-11-27 H200 run, where they beat two everywhere.)
                 sweeps=(dict(queries=(16, 64), contexts=(4096, 65536),
                              tilings=(dict(block_k=128),
                                       # flash attention's usual Hopper tiling (at T = 64 and
                                       # 64K the best of that run)
                                       dict(block_m=128, num_warps=8),
                                       dict(num_stages=2),  # the default before that run
                                       dict(num_stages=4))),
                         dict(queries=(1,), contexts=(1024, 4096),
                              tilings=(dict(split_factor=2), dict(split_factor=4),
                                       dict(num_splits=2), dict(num_splits=8),
                                       dict(num_splits=16), dict(num_stages=3),
                                       dict(num_stages=4))),
                         # T = 64 at short contexts: the split counts of the partials' old
                         # share (a quarter of the cache bytes: 1 at 1K, 4 at 4K; the H200's
                         # 1K case ran 32 programs) and twice the default's.
                         dict(queries=(64,), contexts=(1024, 4096),
                              tilings=(dict(num_splits=1), dict(num_splits=4),
                                       dict(split_factor=2)))),
                 # One profiled run each: the kernel's share of a call against the packing and
                 # combine around it (on the H200, T = 64 ran far below the matmul peak; decode
                 # at batch 1 and 4K took 6.75x its roofline).
                 profile_cases=((1, 4096, 1), (1, 1024, 64), (1, 4096, 64), (1, 65536, 64),
                                (8, 65536, 16))),
    "cpu-tiny": dict(batches=(1, 2), contexts=(64,), queries=(1, 4), heads=4, kv_heads=2,
                     head_dim=16, dtype="float32", inner=2, trials=2, hbm_bytes=1 << 24,
                     matmul_size=256, interpret=True, rotate_bytes=40 << 10, max_copies=2,
                     sweeps=(dict(queries=(4,), contexts=(64,), tilings=(dict(block_k=32),)),
                             dict(queries=(1,), contexts=(64,),
                                  tilings=(dict(split_factor=2),))),
                     profile_cases=((1, 64, 4),)),
}
KEY = ("preset", "kernel", "impl", "batch", "context", "T", "device")
# Records name the version of the kernels they ran (`kernel_sources`, a hash of this code), so
# the device plan measures changed kernels again.
KERNEL_SOURCES = ("pallas_kernels/tree_attention",)


def kv_copies(batch, context, T, spec) -> int:
    """Cache copies a case's calls rotate through: enough that one pass over them outgrows the
    last-level cache (`rotate_bytes`), so each call reads its keys and values from HBM as in
    decoding, where every layer reads its own cache (at most `max_copies`: small caches may
    still partly hit)."""
    itemsize = np.dtype(spec["dtype"]).itemsize
    cache_bytes = 2 * batch * (context + T) * spec["kv_heads"] * spec["head_dim"] * itemsize
    return int(min(spec["max_copies"], max(1, -(-spec["rotate_bytes"] // cache_bytes))))


def case_inputs(batch, context, T, spec, seed=0):
    """Random q and `kv_copies` caches k/v (drawn on the device), lengths = context, a random
    tree over the T new tokens."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    kq, *kkv = jax.random.split(jax.random.key(seed), 1 + 2 * kv_copies(batch, context, T, spec))
    H, K, D = spec["heads"], spec["kv_heads"], spec["head_dim"]
    S = context + T
    dtype = jnp.dtype(spec["dtype"])
    parents = [-1] + [int(rng.integers(0, t)) for t in range(1, T)]
    mask = np.zeros((T, T), bool)
    for t in range(T):
        u = t
        while u >= 0:
            mask[t, u], u = True, parents[u]
    depth = mask.sum(1) - 1
    draw = [jax.random.normal(key, (batch, S, K, D), dtype) for key in kkv]
    return dict(
        q=jax.random.normal(kq, (batch, T, H, D), dtype),
        k=tuple(draw[0::2]), v=tuple(draw[1::2]),
        lengths=jnp.full((batch,), context, jnp.int32),
        positions=jnp.asarray(np.broadcast_to(context + depth, (batch, T)), jnp.int32),
        mask=jnp.asarray(np.broadcast_to(mask, (batch, T, T))),
    )


def case_shapes(batch, context, T, spec) -> tuple:
    """The abstract arguments of a case (what `case_inputs` draws), for compiling ahead."""
    import jax
    import jax.numpy as jnp

    H, K, D = spec["heads"], spec["kv_heads"], spec["head_dim"]
    S, dtype = context + T, jnp.dtype(spec["dtype"])
    shape = jax.ShapeDtypeStruct
    cache = (shape((batch, S, K, D), dtype),) * kv_copies(batch, context, T, spec)
    return (shape((batch, T, H, D), dtype), cache, cache, shape((batch,), jnp.int32),
            shape((batch, T), jnp.int32), shape((batch, T, T), jnp.bool_))


def chained(attn, inner: int):
    """`inner` rounds of calls of `attn` in one jitted loop, each round one call per cache
    copy (unrolled), chained: every call's queries depend on the previous call's output
    through a scalar, so the calls run in order and nothing is hoisted or merged."""
    import jax
    import jax.numpy as jnp

    def loop(q, ks, vs, lengths, positions, mask):
        def body(_, carry):
            bump, acc = carry
            for k, v in zip(ks, vs):
                out = attn(q + bump.astype(q.dtype), k, v, lengths, positions, mask)
                first = out[0, 0, 0, 0].astype(jnp.float32)
                bump, acc = bump + first * 1e-30, acc + first
            return bump, acc
        return jax.lax.fori_loop(0, inner, body, (jnp.float32(0), jnp.float32(0)))

    return jax.jit(loop)


def _floor_kernel(x_ref, o_ref):  # x, o: [8, 128] fp32
    o_ref[...] = x_ref[...] + 1.0


def call_floors(spec) -> dict[str, float]:
    """Microseconds per call of a call that does almost nothing, timed in the same chained
    loop as the cases (`chained`, `timed_loop`): `pallas`, a one-block Pallas kernel (an
    [8, 128] fp32 block plus one); `xla`, the same arithmetic as one XLA fusion. No case can
    take less than its impl's floor, however small its roofline."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    H, K, D = spec["heads"], spec["kv_heads"], spec["head_dim"]
    dtype = jnp.dtype(spec["dtype"])

    def block(q):  # tied to the chain's queries, so the calls stay in order
        return jnp.broadcast_to(q[0, 0, 0, 0].astype(jnp.float32), (8, 128))

    # Named for a GPU, as the kernels are: without it jax 0.10 lowered a GPU pallas_call
    # through Mosaic GPU (Hopper only), jax 0.11 through Triton.
    params = None
    if jax.default_backend() in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams()

    def pallas(q, *_):
        out = pl.pallas_call(_floor_kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                             interpret=spec["interpret"], compiler_params=params)(block(q))
        return out[None, None]

    def xla(q, *_):
        return (block(q) + 1.0)[None, None]

    kv = (jnp.zeros((1, 8, K, D), dtype),)
    inputs = dict(q=jnp.zeros((1, 1, H, D), dtype), k=kv, v=kv,
                  lengths=jnp.zeros((1,), jnp.int32), positions=jnp.zeros((1, 1), jnp.int32),
                  mask=jnp.ones((1, 1, 1), jnp.bool_))
    return {name: timed_loop(chained(attn, spec["inner"]), inputs, spec["inner"],
                             spec["trials"])[0] * 1e6
            for name, attn in (("pallas", pallas), ("xla", xla))}


def _program_args(inputs) -> tuple:
    return (inputs["q"], inputs["k"], inputs["v"], inputs["lengths"], inputs["positions"],
            inputs["mask"])


def timed_loop(program, inputs, inner: int, trials: int) -> tuple[float, int]:
    """(seconds per call: a `chained` program's time / its calls, best of `trials`; the XLA
    compiles its first, untimed call needed: 0 when it was compiled ahead)."""
    import jax

    args = _program_args(inputs)
    with counting_compiles() as compiles:
        jax.block_until_ready(program(*args))
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        best = min(best, time.perf_counter() - start)
    return best / (inner * len(inputs["k"])), compiles[0]


def profiled(program, inputs, inner: int) -> dict:
    """One run of a `chained` program under the profiler (after its timed runs; never the
    timing): `bench.common.profile_kernels`'s summary plus `calls`, the calls it made."""
    try:
        summary = profile_kernels(lambda: program(*_program_args(inputs)))
    except Exception as e:  # noqa: BLE001  (a profiler failure costs only the profile)
        summary = dict(error=repr(e)[:200])
    return dict(summary, calls=inner * len(inputs["k"]))


SWEEPS = {"pallas": "sweeps", "hopper": "hopper_sweeps"}  # impl -> its preset field


def swept(batch, context, T, spec, impl: str = "pallas") -> list[dict]:
    """The other GPU tilings (BlockSizes / HopperBlockSizes fields over the defaults, or
    `split_factor`: that many times the default split count) a case is also timed with by an
    impl: those of every group of the preset's sweeps for it whose `queries` and `contexts`
    hold the case's."""
    return [dict(t) for group in spec.get(SWEEPS[impl], ())
            if T in group["queries"] and context in group["contexts"]
            for t in group["tilings"]]


def block_sizes(tiling: dict, batch, context, T, spec, impl: str = "pallas"):
    """The BlockSizes (HopperBlockSizes for `hopper`) of a swept tiling for a case (a
    `split_factor` resolved to the split count: the default's times the factor, at most one
    key block per split)."""
    from jaxdec.pallas_kernels import tree_attention as TA
    from jaxdec.pallas_kernels.tree_attention import common, gpu, hopper

    fields = {k: v for k, v in tiling.items() if k != "split_factor"}
    K, G, S = spec["kv_heads"], spec["heads"] // spec["kv_heads"], context + T
    if impl == "hopper":
        sizes = TA.HopperBlockSizes(**fields)
        if "split_factor" in tiling:
            default = hopper.default_num_splits(
                batch, K, common.num_rows(T, G, hopper.ROWS), S, T * G, sizes.block_k,
                num_cores=common.gpu_core_count())
            sizes = dataclasses.replace(sizes, num_splits=max(1, min(
                default * tiling["split_factor"], S // sizes.block_k)))
        return sizes
    sizes = dataclasses.replace(TA.default_block_sizes(  # the case's default, then the fields
        TA.Impl.TRITON, S, q_shape=(batch, T, spec["heads"], spec["head_dim"]),
        num_kv_heads=K, dtype=spec["dtype"]), **fields)
    if "split_factor" in tiling:
        default = gpu.num_splits((batch, T, spec["heads"], spec["head_dim"]),
                                 (batch, S, K, spec["head_dim"]),
                                 rows=common.num_rows(T, G, 16), block_sizes=sizes)
        blocks = -(-S // sizes.block_k)
        sizes = dataclasses.replace(
            sizes, num_splits=max(1, min(default * tiling["split_factor"], blocks)))
    return sizes


def case_impls(batch, context, T, spec) -> tuple[str, ...]:
    """What a case times: the Triton (or TPU) kernel and the reference, and the Hopper kernel
    where the preset asks for it, the device is a Hopper and the kernel takes the case."""
    names = ("pallas", "reference")
    if spec.get("hopper") and hopper_device() and hopper_case(batch, context, T, spec):
        names += ("hopper",)
    return names


def hopper_case(batch, context, T, spec) -> bool:
    """Whether the Hopper kernel is for a case: it takes the shapes, and the packed query
    rows (T x G) fill at least one 64-row tile."""
    from jaxdec.pallas_kernels import tree_attention as TA

    return T * spec["heads"] // spec["kv_heads"] >= 64 and TA.unsupported_reason(
        TA.Impl.MOSAIC_GPU, (batch, T, spec["heads"], spec["head_dim"]),
        (batch, context + T, spec["kv_heads"], spec["head_dim"]), dtype=spec["dtype"]) is None


def hopper_device() -> bool:
    """Whether this process's first device is a Hopper GPU (compute capability 9.x)."""
    import jax

    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")
                                            ).startswith("9")


def case_cost(batch, context, T, spec) -> tuple[int, int]:
    """(bytes, flops) a call cannot avoid (see the module doc)."""
    H, K, D = spec["heads"], spec["kv_heads"], spec["head_dim"]
    itemsize = np.dtype(spec["dtype"]).itemsize
    slots = context + T
    nbytes = 2 * batch * slots * K * D * itemsize + 2 * batch * T * H * D * itemsize
    flops = 4 * batch * T * H * slots * D
    return nbytes, flops


def run(preset: str, spec: dict, emit, on_case=lambda records: None,
        compile_ahead: int = 0, budget_s: float | None = None) -> list[dict]:
    """Every case of a preset; `on_case(records so far)` after each (so a run cut off by the
    device call's time limit keeps what it measured). `compile_ahead` threads compile every
    case's programs first, side by side (nothing is timed until they are done). With
    `budget_s`, the compiles ahead stop at half of it (the rest compile at their first call)
    and the cases left at its end are recorded as skipped."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    import jax
    import jax.numpy as jnp

    from jaxdec.pallas_kernels import tree_attention as TA
    from jaxdec.train.loop import measure_matmul_peak

    kernel_impl = TA.backend_kernel() or TA.Impl.TRITON
    impls = {
        "pallas": lambda q, k, v, l, p, m: TA.tree_attention(
            q, k, v, l, p, mask_BTT=m, impl=kernel_impl, interpret=spec["interpret"]),
        "reference": lambda q, k, v, l, p, m: TA.tree_attention(
            q, k, v, l, p, mask_BTT=m, impl=TA.Impl.REFERENCE),
        "hopper": lambda q, k, v, l, p, m: TA.tree_attention(
            q, k, v, l, p, mask_BTT=m, impl=TA.Impl.MOSAIC_GPU, interpret=spec["interpret"]),
    }
    cases = [(b, c, t) for b in spec["batches"] for c in spec["contexts"] for t in spec["queries"]]
    programs = {(*case, name): chained(impls[name], spec["inner"]) for case in cases
                for name in case_impls(*case, spec)}
    kernel_of = {"pallas": kernel_impl, "hopper": TA.Impl.MOSAIC_GPU}
    for case in cases:  # the sweeps' tilings, on the cases they cover
        for name in ("pallas", "hopper"):
            if name not in case_impls(*case, spec):
                continue
            for i, tiling in enumerate(swept(*case, spec, name)):
                sizes = block_sizes(tiling, *case, spec, name)
                programs[(*case, f"{name}-sweep{i}")] = chained(
                    lambda q, k, v, l, p, m, sizes=sizes, name=name: TA.tree_attention(
                        q, k, v, l, p, mask_BTT=m, impl=kernel_of[name],
                        interpret=spec["interpret"], block_sizes=sizes), spec["inner"])
    ahead = CompileAhead(compile_ahead, log=emit)
    for key, program in programs.items():
        shapes = case_shapes(*key[:3], spec)
        ahead.submit(key, lambda program=program, shapes=shapes: program.lower(*shapes).compile())
    ahead.wait(None if deadline is None else deadline - budget_s / 2)
    ahead.close()

    hbm_probes = measure_hbm(spec["hbm_bytes"])
    hbm_gbps = max(hbm_probes.values())
    # in the preset's dtype (bf16 on the devices; the CPU preset's fp32 runs at another peak)
    peak_tflops = measure_matmul_peak(jnp.dtype(spec["dtype"]), size=spec["matmul_size"]) / 1e12
    floors = call_floors(spec)
    emit(f"ceilings: HBM {hbm_gbps:.0f} GB/s (" + ", ".join(
        f"{name} {gbps:.0f}" for name, gbps in hbm_probes.items())
        + f"), {spec['dtype']} matmul {peak_tflops:.3g} TFLOP/s; call floors: Pallas "
        f"{floors['pallas']:.1f} us, XLA {floors['xla']:.1f} us")
    meta = dict(preset=preset, kernel="tree_attention", device=jax.devices()[0].device_kind,
                dtype=spec["dtype"], heads=spec["heads"], kv_heads=spec["kv_heads"],
                head_dim=spec["head_dim"], hbm_gbps=hbm_gbps, hbm_probes=hbm_probes,
                hbm_method=HBM_METHOD, matmul_peak_tflops=peak_tflops, call_floor_us=floors,
                pallas_variant=kernel_impl.value, interpret=spec["interpret"], date=utc_now(),
                commit=git_commit(), kernel_sources=sources_digest(KERNEL_SOURCES),
                **versions())
    records = []
    for batch, context, T in cases:
        nbytes, flops = case_cost(batch, context, T, spec)
        roofline_s = max(nbytes / (hbm_gbps * 1e9), flops / (peak_tflops * 1e12))
        if deadline is not None and time.monotonic() > deadline:
            records += [dict(meta, impl=name, batch=batch, context=context, T=T, bytes=nbytes,
                             flops=flops, roofline_us=roofline_s * 1e6, time_us=None,
                             hbm_fraction=None, error="skipped: time budget used up")
                        for name in case_impls(batch, context, T, spec)]
            emit(f"B={batch} context={context} T={T}: skipped (time budget used up)")
            on_case(records)
            continue
        inputs = case_inputs(batch, context, T, spec)
        times, by_impl = {}, {}
        for name in case_impls(batch, context, T, spec):
            key = (batch, context, T, name)
            record = dict(meta, impl=name, batch=batch, context=context, T=T,
                          kv_copies=kv_copies(batch, context, T, spec),
                          bytes=nbytes, flops=flops, roofline_us=roofline_s * 1e6,
                          compile_ahead_s=ahead.seconds(key))
            try:
                seconds, compiles = timed_loop(programs[key], inputs, spec["inner"],
                                               spec["trials"])
            except Exception as e:  # noqa: BLE001  (record it, keep going)
                record.update(time_us=None, hbm_fraction=None, error=repr(e)[:300])
            else:
                times[name] = seconds
                record.update(
                    time_us=seconds * 1e6, error=None, first_call_compiles=compiles,
                    hbm_fraction=nbytes / seconds / (hbm_gbps * 1e9),
                    flop_fraction=flops / seconds / (peak_tflops * 1e12),
                    vs_roofline=seconds / roofline_s,
                )
                if (batch, context, T) in spec.get("profile_cases", ()):
                    record["profile"] = profiled(programs[key], inputs, spec["inner"])
            records.append(record)
            by_impl[name] = record
        for name in ("pallas", "hopper"):
            if name in times and "reference" in times:
                by_impl[name]["speedup_vs_reference"] = times["reference"] / times[name]
        for name in ("pallas", "hopper"):
            if name not in by_impl:
                continue
            sweep = []
            for i, tiling in enumerate(swept(batch, context, T, spec, name)):
                entry = dict(tiling)
                if "split_factor" in tiling:
                    entry["num_splits"] = block_sizes(tiling, batch, context, T, spec,
                                                      name).num_splits
                try:
                    seconds, _ = timed_loop(programs[(batch, context, T, f"{name}-sweep{i}")],
                                            inputs, spec["inner"], spec["trials"])
                except Exception as e:  # noqa: BLE001  (an invalid tiling is a finding too)
                    entry.update(time_us=None, error=repr(e)[:200])
                else:
                    entry.update(time_us=seconds * 1e6, error=None)
                sweep.append(entry)
            if sweep:  # kept on the impl's record (the default tiling is its own time)
                by_impl[name]["sweep"] = sweep
        emit(f"B={batch} context={context} T={T}: " + ", ".join(
            f"{n} {t * 1e6:.1f} us" for n, t in times.items())
            + f" (roofline {roofline_s * 1e6:.1f} us)")
        del inputs
        on_case(records)
    return records


def _fmt(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


def _tiling(entry: dict) -> str:
    label = ", ".join(f"{k}={entry[k]}" for k in ("block_k", "block_m", "num_warps",
                                                  "num_stages", "probs_in_registers",
                                                  "pingpong")
                      if k in entry)
    if "split_factor" in entry:
        label = ", ".join(filter(None, [label, f"splits x{entry['split_factor']}"]))
    elif "num_splits" in entry:
        label = ", ".join(filter(None, [label, f"num_splits={entry['num_splits']}"]))
    return label or "default"


def _sweep_table(records: list[dict]) -> list[str]:
    """The kernels' times with other tilings, beside their defaults', where a sweep ran: one
    table per kernel and set of tilings."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("sweep"):
            groups.setdefault((r["impl"], tuple(_tiling(e) for e in r["sweep"])), []).append(r)
    if not groups:
        return []
    lines = ["", "Other tilings of the kernels (BlockSizes / HopperBlockSizes fields changed "
             "from the defaults; splits xN: N times the default split count, the count in "
             "brackets), us per call; the best of each row in bold:"]
    for (impl, tilings), rows in groups.items():
        lines += ["", f"`{impl}`:", "",
                  "| batch | context | T | default | " + " | ".join(tilings) + " |",
                  "|---:|---:|---:|---:|" + "---:|" * len(tilings)]
        for r in rows:
            times = [r.get("time_us")] + [e.get("time_us") for e in r["sweep"]]
            best = min((t for t in times if t is not None), default=None)
            cells = ["–" if t is None else f"**{t:.1f}**" if t == best else f"{t:.1f}"
                     for t in times]
            cells = [c + (f" [{e['num_splits']}]" if "split_factor" in e else "")
                     for c, e in zip(cells, [{}] + r["sweep"])]
            lines.append(f"| {r['batch']} | {r['context']} | {r['T']} | "
                         + " | ".join(cells) + " |")
    return lines


def _profile_lines(records: list[dict]) -> list[str]:
    """Where a call's time went, for the profiled cases: device kernel time per call, the
    longest kernels."""
    profiled = [r for r in records if r.get("profile")]
    if not profiled:
        return []
    lines = ["", "Where a call's time goes (one profiled run of the timed loop; device kernel "
             "time per call, the loop's own small ops included):", ""]
    for r in sorted(profiled, key=lambda r: (r["batch"], r["context"], r["T"], r["impl"])):
        prof, case = r["profile"], f"batch {r['batch']}, context {r['context']}, T {r['T']}"
        if prof.get("error"):
            lines.append(f"- {case}, {r['impl']}: no kernel profile ({prof['error']})")
            continue
        calls = prof["calls"]
        top = "; ".join(f"`{k['name'][:60]}` {k['ms'] * 1e3 / calls:.1f} us"
                        f" ({k['calls'] / calls:g} per call)" for k in prof["kernels"][:5])
        lines.append(f"- {case}, {r['impl']}: {prof['kernel_s'] * 1e6 / calls:.1f} us of kernels "
                     f"per call (timed: {_fmt(r.get('time_us'))} us). {top}")
    return lines


def _probes(record: dict) -> str:
    probes = record.get("hbm_probes")
    if not probes:
        method = record.get("hbm_method", "one dispatched x + 1, before the loop probes")
        return f" (method: {method})"
    return " (best of " + ", ".join(f"{k} {v:.0f}" for k, v in probes.items()) + ")"


def _floors(record: dict) -> str:
    floors = record.get("call_floor_us")
    if not floors:  # records from before the floors were measured
        return ""
    return (f" Call floors in the same timed loop (a call that does almost nothing): a "
            f"one-block Pallas kernel {floors['pallas']:.1f} us, one XLA fusion "
            f"{floors['xla']:.1f} us.")


def _rotation(records: list[dict]) -> str:
    copies = [r["kv_copies"] for r in records if r.get("kv_copies")]
    if not copies:
        return " Every call read the same cache (small ones may have been served from L2)."
    return (f" Each case's calls rotate through {min(copies)} to {max(copies)} copies of its "
            "cache (`kv_copies`), so reads come from HBM rather than a warm L2.")


def _run_text(record: dict) -> str:
    return (f"{record['date']} (jax {record.get('jax_version')}, commit {record.get('commit')}, "
            f"HBM {record['hbm_gbps']:.0f} GB/s, matmul {record['matmul_peak_tflops']:.3g} "
            "TFLOP/s)")


def render_markdown(records: list[dict]) -> str:
    if not records:
        return "# Tree-attention kernel\n\nNo records.\n"
    first = newest(records)
    lines = [
        "# Tree-attention kernel vs XLA reference",
        "",
        f"Device {first['device']}, jax {first.get('jax_version')}, {first['date']}, "
        f"preset `{first['preset']}`; {first['heads']} query / {first['kv_heads']} KV heads, "
        f"head dim {first['head_dim']}, {first['dtype']}. Ceilings measured in the same run: "
        f"HBM {first['hbm_gbps']:.0f} GB/s{_probes(first)}, matmul "
        f"{first['matmul_peak_tflops']:.3g} TFLOP/s. "
        "Times per call (us); roofline = max(bytes / HBM, FLOPs / matmul peak)."
        + _floors(first) + _rotation(records) + runs_note(records, _run_text),
        "",
        "| batch | context | T | pallas us | reference us | roofline us | pallas / roofline "
        "| speedup vs reference | pallas HBM fraction | reference HBM fraction |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = {}
    for r in records:
        cases.setdefault((r["batch"], r["context"], r["T"]), {})[r["impl"]] = r
    hopper = any("hopper" in by_impl for by_impl in cases.values())
    if hopper:
        lines[-2] = lines[-2][:lines[-2].index(" reference us")] + " hopper us |" + lines[-2][
            lines[-2].index(" reference us"):] + " hopper / roofline | hopper speedup |"
        lines[-1] += "---:|---:|---:|"
    for (batch, context, T), by_impl in sorted(cases.items()):
        p, ref = by_impl.get("pallas", {}), by_impl.get("reference", {})
        roof = (p or ref).get("roofline_us")
        h = by_impl.get("hopper", {})
        hopper_time = f" {_fmt(h.get('time_us'))} |" if hopper else ""
        hopper_ratios = (f" {_fmt(h.get('vs_roofline'), '.2f')} | "
                         f"{_fmt(h.get('speedup_vs_reference'), '.2f')} |") if hopper else ""
        lines.append(
            f"| {batch} | {context} | {T} | {_fmt(p.get('time_us'))} |{hopper_time} "
            f"{_fmt(ref.get('time_us'))} | {_fmt(roof)} | {_fmt(p.get('vs_roofline'), '.2f')} | "
            f"{_fmt(p.get('speedup_vs_reference'), '.2f')} | "
            f"{_fmt(p.get('hbm_fraction'), '.2f')} | {_fmt(ref.get('hbm_fraction'), '.2f')} |"
            + hopper_ratios
        )
    # The goals ask it of the kernel: each case's faster kernel (Triton or, where it ran,
    # Hopper).
    best = [min((r for r in by_impl.values() if r["impl"] != "reference" and r.get("time_us")),
                key=lambda r: r["time_us"], default=None) for by_impl in cases.values()]
    best = [r for r in best if r is not None]
    long = [r for r in best if r["context"] >= 4096]
    wide = [r for r in best if r["T"] == 64 and r.get("speedup_vs_reference")]
    which = " (each case's faster kernel)" if hopper else ""
    lines.append("")
    if long:
        worst = max(long, key=lambda r: r["vs_roofline"])
        floor = (worst.get("call_floor_us") or {}).get("pallas")
        below = (f"; its roofline {worst['roofline_us']:.1f} us, a Pallas call's floor here "
                 f"{floor:.1f} us" if floor is not None else "")
        lines.append(f"Goal (context >= 4K within 1.4x of roofline){which}: worst case "
                     f"{worst['vs_roofline']:.2f}x (batch {worst['batch']}, context "
                     f"{worst['context']}, T {worst['T']}, {worst['impl']}{below}) -> "
                     f"{'met' if worst['vs_roofline'] <= 1.4 else 'not met'}.")
    if wide:
        slowest = min(wide, key=lambda r: r["speedup_vs_reference"])
        lines.append(f"Goal (>= 3x over the reference at T = 64){which}: smallest speedup "
                     f"{slowest['speedup_vs_reference']:.2f}x ({slowest['impl']}) -> "
                     f"{'met' if slowest['speedup_vs_reference'] >= 3 else 'not met'}.")
    lines += _sweep_table(records)
    lines += _profile_lines(records)
    above = [r for r in records if (r.get("hbm_fraction") or 0) > 1.05]
    if above:  # faster than streaming the bytes at the ceiling: the ceiling is too low
        lines.append(f"Warning: {len(above)} timings read faster than the measured HBM ceiling "
                     f"(up to {max(r['hbm_fraction'] for r in above):.2f}x): the ceiling was "
                     "under-measured, so the rooflines and goal lines above are too lenient.")
    errors = [r for r in records if r.get("error")]
    for r in errors:
        lines.append(f"- error: {r['impl']} batch {r['batch']} context {r['context']} T {r['T']}: "
                     f"{r['error']}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, records: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(records[0]["device"]) if records else "unknown"
    path = out_dir / f"kernels-{slug}.json"
    write_merged(path, records, KEY, render_markdown, indent=1)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--out", type=out_dir, default=RESULTS)
    parser.add_argument("--inner", type=int, help="calls per timed loop")
    parser.add_argument("--trials", type=int, help="timed loops (best is kept)")
    parser.add_argument("--no-hopper", action="store_true",
                        help="leave the Hopper (Mosaic GPU) kernel out (bench/device.py passes "
                             "it when the kernel failed its GPU tests in the same call)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: the compiles ahead stop at half of "
                             "it, the cases left at its end are recorded as skipped")
    parser.add_argument("--compile-ahead", type=int, metavar="THREADS",
                        help="threads that compile every case's programs before any is timed "
                             "(0: each compiles at its first call; default: half the CPU "
                             "cores up to 8 on an accelerator, 0 on a CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = dict(PRESETS[args.preset])
    for name in ("inner", "trials"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name} must be >= 1, got {value}")
            spec[name] = value
    if args.no_hopper and spec.get("hopper"):
        spec["hopper"] = False
        print("the Hopper kernel is left out (--no-hopper)", flush=True)
    workers = default_compile_workers() if args.compile_ahead is None else args.compile_ahead
    if workers < 0:
        raise SystemExit(f"--compile-ahead must be >= 0, got {workers}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise SystemExit(f"--budget-s must be positive, got {args.budget_s}")
    out = args.out
    records = run(args.preset, spec, lambda line: print(line, flush=True),
                  on_case=lambda so_far: write_outputs(out, list(so_far)), compile_ahead=workers,
                  budget_s=args.budget_s)
    path = write_outputs(args.out, records)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all(r.get("error") is None for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
