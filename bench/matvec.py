"""Decode's matrix-vector products: the Pallas kernel (`jaxdec.pallas_kernels.matvec`)
against XLA's product, on the projections of a Llama-3-8B layer, against the HBM roofline.

Usage (on the lent GPU machine, one call; results land in $OUT):

    python3 -m pip install --no-deps --no-build-isolation -e . && \\
        python3 bench/matvec.py --preset h100 --out $OUT

and on a CPU (the kernel interpreted; checks the script, not speed):
`python3 bench/matvec.py --preset cpu-tiny --out /tmp/bench`. Writes `matvec-<device>.json`
and `matvec-<device>.md` to `--out` (default bench/results/).

Why: in the H200 decode profile (commit bff28a8) XLA's fused products read the q|k|v weights
at 64% of the measured bandwidth and o's at 74% (gate|up 89%, down 93%): ~0.55 ms of the
4.62 ms step, the largest share of the gap to the decode goal. This says whether a kernel of
our own reads them faster, before any model code depends on it.

Cases (h100): x [rows, K] @ W [K, N] in bf16 for q|k|v (4096 x 6144), o (4096 x 4096),
gate|up (2 x 4096 x 14336: x times each of the two matrices, in one kernel launch or one
batched product, as the model runs it) and down (14336 x 4096), rows = 1 and 16 (decode at
batch 1 and 16).
Impls: `pallas` (default tiling; its fp32 partials summed by XLA), `xla` (jnp.dot with fp32
accumulation: XLA's Triton GEMM fusions, autotuned on the card) and `xla-cublas` (the same
program compiled with `xla_gpu_enable_triton_gemm=False`, so cuBLAS runs it). Each call's
output is consumed by one reduction (as a layer's next fusion consumes a projection; XLA
folds the kernel's split sum into it), and the next call's rows depend on it (nothing is
hoisted); calls rotate through enough weight copies that a round reads ~100 MB (twice the
L2). Time per call = the best of `trials` jitted loops of `inner` rounds / its calls.

Roofline: bytes = the weights (G x K x N x 2 in bf16) / the HBM bandwidth measured in the same
run (`bench.common.measure_hbm`'s best probe); hbm_fraction = bytes / time / bandwidth. A
few other tilings of the kernel (`sweeps`) are timed beside the default where the gap was
largest (q|k|v and o at one row; q|k|v at 16 rows). Records carry `kernel_sources` (a hash
of the kernel's code), so the device plan measures a changed kernel again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    HBM_METHOD, RESULTS, device_slug, git_commit, measure_hbm, newest, out_dir, runs_note,
    sources_digest, utc_now, versions, write_merged)

KERNEL_SOURCES = ("pallas_kernels/matvec",)  # records name the version of the kernel they ran

# name: (K, N) or (K, N, G) (G matrices [K, N]) of a Llama-3-8B layer's projections (q|k|v
# and gate|up fused, as jaxdec's weights are)
LLAMA3_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 14336, 2),
             "down": (14336, 4096)}
PRESETS = {
    "h100": dict(projections=LLAMA3_8B, rows=(1, 16), dtype="bfloat16", inner=20, trials=5,
                 hbm_bytes=1 << 30, rotate_bytes=100 << 20, max_copies=4, interpret=False,
                 cublas=True,
                 # Narrower or wider tiles, a deeper or shallower pipeline, more splits.
                 sweeps=(dict(projections=("qkv", "o"), rows=(1,),
                              tilings=(dict(block_n=64), dict(block_k=128, num_stages=3),
                                       dict(block_n=256, num_warps=8),
                                       dict(num_stages=6), dict(split_factor=2))),
                         dict(projections=("qkv",), rows=(16,),
                              tilings=(dict(num_stages=2), dict(block_n=64))))),
    "cpu-tiny": dict(projections={"qkv": (256, 384), "gate_up": (256, 128, 2),
                                  "down": (512, 128)}, rows=(1, 4),
                     dtype="float32", inner=2, trials=2, hbm_bytes=1 << 24,
                     rotate_bytes=1 << 20, max_copies=2, interpret=True, cublas=False,
                     sweeps=(dict(projections=("qkv",), rows=(1,),
                                  tilings=(dict(block_n=64), dict(split_factor=2))),)),
}
KEY = ("preset", "impl", "projection", "rows", "device")


def copies(K: int, N: int, spec: dict) -> int:
    """Weight copies a case rotates through so a round reads ~`rotate_bytes`."""
    nbytes = K * N * np.dtype(spec["dtype"]).itemsize
    return int(min(spec["max_copies"], max(1, -(-spec["rotate_bytes"] // nbytes))))


def block_sizes(tiling: dict, K: int, N: int, groups: int = 1):
    """The kernel's BlockSizes for a swept tiling (`split_factor`: that many times the
    default's split count, as long as the splits still divide K into whole steps)."""
    import dataclasses

    from jaxdec.pallas_kernels import matvec as MV

    sizes = MV.BlockSizes(**{k: v for k, v in tiling.items() if k != "split_factor"})
    if "split_factor" in tiling:
        splits = MV.default_num_splits(K, N, sizes, groups=groups) * tiling["split_factor"]
        while K % (splits * sizes.block_k):
            splits //= 2
        sizes = dataclasses.replace(sizes, num_splits=max(1, splits))
    return sizes


def chained(product, inner: int, compiler_options=None):
    """`inner` rounds, each one call of `product(x, w)` per weight copy, in one jitted loop;
    each output is summed (its consumer) and feeds the next call's rows through a scalar."""
    import jax
    import jax.numpy as jnp

    def loop(x, ws):
        def body(_, carry):
            bump, acc = carry
            for w in ws:
                total = jnp.sum(product(x + bump.astype(x.dtype), w))
                bump, acc = bump + total * 1e-30, acc + total
            return bump, acc
        return jax.lax.fori_loop(0, inner, body, (jnp.float32(0), jnp.float32(0)))

    return jax.jit(loop, compiler_options=compiler_options)


def timed(program, x, ws, inner: int, trials: int) -> float:
    import jax

    jax.block_until_ready(program(x, ws))
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        jax.block_until_ready(program(x, ws))
        best = min(best, time.perf_counter() - start)
    return best / (inner * len(ws))


def run(preset: str, spec: dict, emit, on_case=lambda records: None) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxdec.pallas_kernels import matvec as MV

    dtype = jnp.dtype(spec["dtype"])
    impls = {
        "pallas": (lambda x, w: MV.matvec(x, w, impl="triton", interpret=spec["interpret"]),
                   None),
        "xla": (lambda x, w: MV.matvec(x, w, impl="reference"), None),
    }
    if spec["cublas"]:
        impls["xla-cublas"] = (lambda x, w: MV.matvec(x, w, impl="reference"),
                               {"xla_gpu_enable_triton_gemm": False})
    hbm_probes = measure_hbm(spec["hbm_bytes"])
    hbm_gbps = max(hbm_probes.values())
    emit(f"HBM {hbm_gbps:.0f} GB/s (" + ", ".join(f"{k} {v:.0f}" for k, v in hbm_probes.items())
         + ")")
    meta = dict(preset=preset, kernel="matvec", device=jax.devices()[0].device_kind,
                dtype=spec["dtype"], hbm_gbps=hbm_gbps, hbm_probes=hbm_probes,
                hbm_method=HBM_METHOD, interpret=spec["interpret"], date=utc_now(),
                commit=git_commit(), kernel_sources=sources_digest(KERNEL_SOURCES),
                **versions())
    records = []
    key = jax.random.key(0)
    for name, (K, N, *groups) in spec["projections"].items():
        G = groups[0] if groups else 1
        lead = (G,) if groups else ()
        n_copies = copies(K, G * N, spec)
        keys = jax.random.split(jax.random.fold_in(key, K * N), n_copies + 1)
        ws = tuple(jax.random.normal(k, lead + (K, N), dtype) * K**-0.5 for k in keys[1:])
        nbytes = G * K * N * dtype.itemsize
        roofline_s = nbytes / (hbm_gbps * 1e9)
        for rows in spec["rows"]:
            x = jax.random.normal(keys[0], (rows, K), dtype)
            times = {}
            for impl, (product, options) in impls.items():
                record = dict(meta, impl=impl, projection=name, rows=rows, K=K, N=N,
                              groups=G, weight_copies=n_copies, bytes=nbytes,
                              roofline_us=roofline_s * 1e6)
                if impl == "pallas":
                    sizes = MV.BlockSizes()
                    record.update(block_sizes=vars(sizes),
                                  num_splits=MV.default_num_splits(K, N, sizes, groups=G))
                try:
                    seconds = timed(chained(product, spec["inner"], options), x, ws,
                                    spec["inner"], spec["trials"])
                except Exception as e:  # noqa: BLE001  (record it, keep going)
                    record.update(time_us=None, hbm_fraction=None, error=repr(e)[:300])
                else:
                    times[impl] = seconds
                    record.update(time_us=seconds * 1e6, error=None,
                                  hbm_fraction=nbytes / seconds / (hbm_gbps * 1e9))
                records.append(record)
            pallas = next(r for r in records[-len(impls):] if r["impl"] == "pallas")
            if "pallas" in times and "xla" in times:
                pallas["speedup_vs_xla"] = times["xla"] / times["pallas"]
            sweep = []
            for group in spec.get("sweeps", ()):
                if name not in group["projections"] or rows not in group["rows"]:
                    continue
                for tiling in group["tilings"]:
                    entry = dict(tiling)
                    try:
                        sizes = block_sizes(tiling, K, N, G)
                        entry["num_splits"] = sizes.num_splits or MV.default_num_splits(
                            K, N, sizes, groups=G)
                        product = (lambda x, w, sizes=sizes: MV.matvec(
                            x, w, impl="triton", interpret=spec["interpret"],
                            block_sizes=sizes))
                        seconds = timed(chained(product, spec["inner"]), x, ws,
                                        spec["inner"], spec["trials"])
                    except Exception as e:  # noqa: BLE001  (an invalid tiling is a finding)
                        entry.update(time_us=None, error=repr(e)[:200])
                    else:
                        entry.update(time_us=seconds * 1e6, error=None,
                                     hbm_fraction=nbytes / seconds / (hbm_gbps * 1e9))
                    sweep.append(entry)
            if sweep:
                pallas["sweep"] = sweep
            emit(f"{name} rows={rows}: " + ", ".join(
                f"{i} {t * 1e6:.1f} us" for i, t in times.items())
                + f" (roofline {roofline_s * 1e6:.1f} us)")
            on_case(records)
        del ws
    return records


def _fmt(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


def render_markdown(records: list[dict]) -> str:
    first = newest(records)
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lines = [
        "# Decode's matrix-vector products: Pallas kernel vs XLA",
        "",
        f"Device {first['device']}, jax {first['jax_version']}, {first['date']}, preset "
        f"`{first['preset']}`, commit {first['commit']}; {first['dtype']}. HBM "
        f"{first['hbm_gbps']:.0f} GB/s measured in the same run ({first['hbm_method']}). "
        "Times per call (us, the output's consumer included); roofline = weight bytes / HBM."
        + runs_note(records, lambda r: f"{r['date']} (jax {r['jax_version']}, commit "
                                       f"{r['commit']}, HBM {r['hbm_gbps']:.0f} GB/s)"),
        "",
        "| projection | rows | K x N | " + " | ".join(f"{i} us" for i in impls)
        + " | roofline us | " + " | ".join(f"{i} HBM fraction" for i in impls)
        + " | pallas speedup vs xla |",
        "|---|---:|---|" + "---:|" * (2 * len(impls) + 2),
    ]
    cases = list(dict.fromkeys((r["projection"], r["rows"]) for r in records))
    for projection, rows in cases:
        by_impl = {r["impl"]: r for r in records
                   if r["projection"] == projection and r["rows"] == rows}
        any_record = next(iter(by_impl.values()))
        cells = [_fmt(by_impl.get(i, {}).get("time_us")) for i in impls]
        fractions = [_fmt(by_impl.get(i, {}).get("hbm_fraction"), ".2f") for i in impls]
        speedup = by_impl.get("pallas", {}).get("speedup_vs_xla")
        shape = f"{any_record['K']} x {any_record['N']}"
        if any_record.get("groups", 1) > 1:
            shape = f"{any_record['groups']} x {shape}"
        lines.append(f"| {projection} | {rows} | {shape} | "
                     + " | ".join(cells) + f" | {any_record['roofline_us']:.1f} | "
                     + " | ".join(fractions) + f" | {_fmt(speedup, '.2f')} |")
    swept = [r for r in records if r.get("sweep")]
    if swept:
        lines += ["", "Other tilings of the kernel (BlockSizes fields changed from the defaults; "
                  "splits xN: N times the default split count; the split count in brackets), "
                  "us per call:", ""]
        for r in swept:
            parts = []
            for e in r["sweep"]:
                label = ", ".join(f"{k}={v}" for k, v in e.items()
                                  if k not in ("time_us", "error", "hbm_fraction",
                                               "num_splits"))
                parts.append(f"{label} [{e.get('num_splits')}]: {_fmt(e.get('time_us'))}")
            lines.append(f"- {r['projection']}, rows {r['rows']}: default "
                         f"[{r.get('num_splits')}] {_fmt(r.get('time_us'))}; " + "; ".join(parts))
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", "Failed: " + "; ".join(
            f"{r['impl']} {r['projection']} rows {r['rows']}: {r['error'][:120]}"
            for r in errors)]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, records: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(records[0]["device"])
    path = out_dir / f"matvec-{slug}.json"
    write_merged(path, records, KEY, render_markdown, indent=1)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="h100", choices=sorted(PRESETS))
    parser.add_argument("--out", type=out_dir, default=RESULTS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = PRESETS[args.preset]
    records = run(args.preset, spec, emit=lambda line: print(line, flush=True),
                  on_case=lambda records: write_outputs(args.out, records))
    path = write_outputs(args.out, records)
    print(path.with_suffix(".md").read_text())
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
