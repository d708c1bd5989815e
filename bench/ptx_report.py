"""What the GPU kernels compile to on an H100, without one: registers, spills, shared memory,
tensor-core instructions, per Triton program, for the kernels benchmark's cases and tilings
(tree attention) and the matvec benchmark's (decode's matrix-vector products).

The device is lent rarely and briefly; a tiling that spills registers, overflows shared
memory, or misses Hopper's tensor-core instructions (`wgmma`) can be told apart on any
machine. This lowers each Pallas Triton kernel of a call for CUDA (jax's
lowering targets compute capability 9.0 when no GPU is present), compiles the Triton IR with
the `triton` package for sm_90a, and reads `ptxas -v` (the ptxas Triton ships) for the
resources:

    pip install triton    # its wheel bundles LLVM and ptxas: no CUDA toolkit, no GPU
    python bench/ptx_report.py [--preset h100] [--out bench/results]

It writes `ptx-sm_90a.json` (one record per case, tiling and program; another preset than h100:
`ptx-sm_90a-<preset>.json`) and a Markdown table.
With `--mosaic` it compiles the Hopper kernel (`tree_attention/hopper.py`, Mosaic GPU)
instead, through jax's own pipeline for a compile-only H100 (jax >= 0.11 and
`jax-cuda12-plugin[with-cuda]`, no GPU), and writes `mosaic-sm_90a.json/.md` (named the same
way).
Static facts only: how fast a program runs is for `bench/kernels.py` on the device to say.
(The Triton of the `triton` package is not the one bundled in jaxlib, which compiles the
same IR on the device; the two may differ in detail, never in kind: a spill or a shared
memory overflow here is worth a look before spending device time on that tiling.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import git_commit, out_dir, replace_text, utc_now, versions  # noqa: E402

TARGET = "sm_90a"
SHARED_LIMIT = 227 * 1024  # an H100 program's most dynamic shared memory
SHARED_PER_CORE = 228 * 1024  # shared memory per multiprocessor ...
SHARED_RESERVED = 1024  # ... of which each resident program takes this much for the system
REGISTER_FILE = 64 * 1024  # 32-bit registers per multiprocessor
REGISTER_UNIT = 256  # registers are given to a warp in units of this many
MAX_WARPS, MAX_PROGRAMS = 64, 32  # resident on one multiprocessor at most


def programs_per_core(registers: int, num_warps: int, shared: int) -> int:
    """Programs (thread blocks) one H100 multiprocessor holds at once, the least of what
    its registers (given to each warp in `REGISTER_UNIT`s), shared memory, warp slots and
    program slots allow (CUDA's occupancy rules for compute capability 9.0)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTER_FILE // per_warp) // num_warps
    by_shared = SHARED_PER_CORE // (shared + SHARED_RESERVED) if shared else MAX_PROGRAMS
    return min(by_registers, by_shared, MAX_WARPS // num_warps, MAX_PROGRAMS)


@contextlib.contextmanager
def captured_programs():
    """Collects (name, Triton IR text, grid, num_warps, num_stages) of every Pallas Triton
    kernel lowered inside the block (jax's lowering hook, found by name at call time)."""
    from jax._src.pallas.triton import lowering

    programs, original = [], lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        caller = sys._getframe(1).f_locals  # the pallas_call lowering rule: its launch params
        programs.append(dict(
            name=str(caller.get("name", "?")), ir=result.module.operation.get_asm(),
            grid=[int(g) for g in result.grid],
            num_warps=int(caller.get("num_warps", 4)),
            num_stages=int(caller.get("num_stages", 3))))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield programs
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(fn, *args) -> None:
    """Lowers `fn(*args)` (abstract arguments) for CUDA with an H100 described to jax."""
    import jax
    from jax._src.mesh import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                            num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def ptxas_path() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        raise RuntimeError(f"the triton package has no bundled ptxas at {path}")
    return path


def compile_program(program: dict, workdir: Path) -> dict:
    """One captured program compiled for sm_90a: its resources and instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = workdir / f"{program['name']}.ttir"
    source.write_text(program["ir"])
    kernel = triton.compile(str(source), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=program["num_warps"],
                                         num_stages=program["num_stages"]))
    ptx = kernel.asm["ptx"]
    ptx_file = workdir / f"{program['name']}.ptx"
    ptx_file.write_text(ptx)
    proc = subprocess.run([str(ptxas_path()), f"-arch={TARGET}", "-v", str(ptx_file), "-o",
                           str(workdir / "out.cubin")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-500:]}")
    log = proc.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    shared = int(kernel.metadata.shared)
    return dict(
        registers=registers, spill_bytes=sum(spills), shared_bytes=shared,
        programs_per_core=programs_per_core(registers, program["num_warps"], shared),
        wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
        async_copies=ptx.count("cp.async"),
    )


def _records_of(call, args, fields: dict) -> list[dict]:
    """One record per Triton program of `call(*args)` (abstract arguments), compiled."""
    records = []
    with captured_programs() as programs, tempfile.TemporaryDirectory() as tmp:
        lower_for_cuda(call, *args)
        for program in programs:
            record = dict(fields, program=program["name"], grid=program["grid"],
                          num_warps=program["num_warps"], num_stages=program["num_stages"],
                          target=TARGET)
            try:
                record.update(compile_program(program, Path(tmp)))
                record["error"] = None
            except Exception as e:  # noqa: BLE001  (a failed compile is the finding)
                record["error"] = f"{type(e).__name__}: {e}"[:300]
            records.append(record)
    return records


def report_case(batch, context, T, spec, tiling: dict) -> list[dict]:
    """The records of one `tree_attention` call (the Triton kernel, default tiling or one of
    the sweep's) of the kernels benchmark's case."""
    from bench.kernels import block_sizes, case_shapes
    from jaxdec.pallas_kernels.tree_attention import gpu

    q, ks, vs, lengths, positions, mask = case_shapes(batch, context, T, spec)
    sizes = block_sizes(tiling, batch, context, T, spec)

    def call(q, k, v, lengths, positions, mask):
        return gpu.tree_attention_gpu(q, k, v, lengths, positions, mask, window=None,
                                      block_sizes=sizes)

    return _records_of(call, (q, ks[0], vs[0], lengths, positions, mask),
                       dict(kernel="tree_attention", batch=batch, context=context, T=T,
                            tiling=tiling or "default"))


def report_matvec(projection: str, rows: int, spec: dict, tiling: dict) -> list[dict]:
    """The record of one matrix-vector product of the matvec benchmark's preset."""
    import jax
    import jax.numpy as jnp

    from bench.matvec import block_sizes
    from jaxdec.pallas_kernels.matvec import gpu

    K, N, *groups = spec["projections"][projection]
    G = groups[0] if groups else 1
    sizes = block_sizes(tiling, K, N, G)
    dtype = jnp.dtype(spec["dtype"])

    def call(x, w):
        return gpu.matvec_gpu(x, w, block_sizes=sizes)

    return _records_of(call, (jax.ShapeDtypeStruct((rows, K), dtype),
                              jax.ShapeDtypeStruct((G,) * bool(groups) + (K, N), dtype)),
                       dict(kernel="matvec", projection=projection, rows=rows, K=K, N=N,
                            groups=G, tiling=tiling or "default"))


def run(preset: str) -> list[dict]:
    """The tree-attention programs of the kernels benchmark's preset and the matrix-vector
    programs of the matvec benchmark's preset of the same name, each case with its sweep's
    tilings."""
    import triton

    from bench import kernels, matvec

    meta = dict(preset=preset, date=utc_now(), commit=git_commit(),
                jax_version=versions()["jax_version"], triton_version=triton.__version__)
    records = []
    spec = kernels.PRESETS[preset]
    for batch in spec["batches"]:
        for context in spec["contexts"]:
            for T in spec["queries"]:
                for tiling in [{}] + kernels.swept(batch, context, T, spec):
                    records += [dict(meta, **r) for r in report_case(batch, context, T, spec,
                                                                       tiling)]
    spec = matvec.PRESETS[preset]
    for projection in spec["projections"]:
        for rows in spec["rows"]:
            tilings = [t for group in spec.get("sweeps", ())
                       if projection in group["projections"] and rows in group["rows"]
                       for t in group["tilings"]]
            for tiling in [{}] + tilings:
                records += [dict(meta, **r) for r in report_matvec(projection, rows, spec,
                                                                     tiling)]
    return records


# ------------------------------------------------------------- the Mosaic GPU (Hopper) kernel


@contextlib.contextmanager
def captured_output():
    """Everything written to this process's stdout and stderr file descriptors inside the
    block (C++ included: Mosaic GPU prints ptxas's report there), as a list of one string."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    text = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def mosaic_unavailable() -> str | None:
    """Why this machine cannot compile the Hopper kernel for an H100 (None when it can): it
    needs jax >= 0.11 and XLA's CUDA plugin with its CUDA libraries (no GPU)."""
    from jaxdec.pallas_kernels.tree_attention import hopper

    if not hopper.interpret_supported():
        return "the Hopper kernel's Mosaic GPU lowering is checked with jax >= 0.11"
    try:
        from bench.census import compile_only_devices

        compile_only_devices("h100")
    except Exception as e:  # noqa: BLE001  (the reason is the answer)
        return f"no compile-only H100: {e}"[:300]
    return None


def report_hopper(batch, context, T, spec, tiling: dict) -> dict:
    """The Hopper kernel of one kernels-benchmark case and tiling compiled for sm_90a by jax's
    own Mosaic GPU pipeline (a compile-only H100): ptxas's registers and spills, the shared
    memory Mosaic GPU allocates, the kernel's grid and warpgroups."""
    import os

    import jax
    import numpy as np
    from jax.sharding import Mesh, SingleDeviceSharding

    from bench.census import compile_only_devices
    from bench.kernels import block_sizes, case_shapes
    from jaxdec.pallas_kernels.tree_attention import common, hopper

    device = compile_only_devices("h100")[0]
    sizes = block_sizes(tiling, batch, context, T, spec, "hopper")
    q, ks, vs, lengths, positions, mask = case_shapes(batch, context, T, spec)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(device))
            for x in (q, ks[0], vs[0], lengths, positions, mask)]
    G = spec["heads"] // spec["kv_heads"]
    rows = common.num_rows(T, G, hopper.ROWS)
    wgs = 2 if rows >= 2 * hopper.ROWS else 1
    splits = sizes.num_splits or hopper.default_num_splits(
        batch, spec["kv_heads"], rows, context + T, T * G, sizes.block_k, 132)
    record = dict(kernel="tree_attention", program="tree_attention_hopper", batch=batch,
                  context=context, T=T, tiling=tiling or "default", target=TARGET,
                  grid=[rows // (wgs * hopper.ROWS), splits, batch * spec["kv_heads"]],
                  warpgroups=wgs + 1, block_k=sizes.block_k, num_stages=sizes.num_stages)
    flags = {"MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_RESOURCES": "1"}
    before = {k: os.environ.get(k) for k in flags}
    os.environ.update(flags)
    try:
        with captured_output() as out, jax.set_mesh(Mesh(np.array([device]), ("x",))):
            jax.jit(lambda *a: hopper.tree_attention_hopper(*a, sizes=sizes)).lower(
                *args).compile()
    except Exception as e:  # noqa: BLE001  (a failed compile is the finding)
        return dict(record, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log = out[0]
    used = re.search(r"Compiling entry function '(\w*mosaic_gpu\w*)'.*?Used (\d+) registers",
                     log, re.S)
    smem = re.search(r"smem_scratch_bytes=(\d+)", log)
    if not used or not smem:
        return dict(record, error="no ptxas report for the Mosaic GPU kernel in the compile "
                                  "output (a cached compile?)")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                       log[used.start():])
    return dict(record, error=None, registers=int(used.group(2)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                shared_bytes=int(smem.group(1)))


def run_mosaic(preset: str) -> list[dict]:
    """The Hopper kernel for the kernels benchmark's cases it takes (at one context: the
    program does not depend on it beyond its grid) and the Hopper sweep's tilings."""
    import jax

    from bench import kernels

    spec = kernels.PRESETS[preset]
    meta = dict(preset=preset, date=utc_now(), commit=git_commit(), jax_version=jax.__version__)
    records = []
    context = max(c for c in spec["contexts"] if c <= 4096)
    for batch in spec["batches"]:
        for T in spec["queries"]:
            if not kernels.hopper_case(batch, context, T, spec):
                continue
            tilings = [t for group in spec.get("hopper_sweeps", ())
                       if T in group["queries"] for t in group["tilings"]]
            for tiling in [{}] + tilings:
                records.append(dict(meta, **report_hopper(batch, context, T, spec, tiling)))
    return records


def render_mosaic_markdown(records: list[dict]) -> str:
    first = records[0]
    lines = [
        "# The Hopper tree-attention kernel (Mosaic GPU) compiled for an H100 (static)",
        "",
        f"Compiled by jax {first['jax_version']}'s Mosaic GPU pipeline for a compile-only H100 "
        f"on a machine without a GPU (commit {first['commit']}, {first['date']}); ptxas's "
        f"report for {TARGET}. Registers per thread (the compute warpgroups raise theirs to "
        "232, the memory warpgroup lowers its to 40), spilled bytes, the shared memory Mosaic "
        "GPU allocates per program (one program per multiprocessor). No timings: those are "
        "`kernels-<device>.md`'s.",
        "",
        "| batch | context | T | tiling | grid (tiles x splits x B*K) | warpgroups | "
        "block_k | stages | registers | spills (B) | shared (KiB) |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        head = (f"| {r['batch']} | {r['context']} | {r['T']} | {_tiling(r)} | "
                f"{'x'.join(map(str, r['grid']))} | {r['warpgroups']} | {r['block_k']} | "
                f"{r['num_stages']} | ")
        if r["error"]:
            lines.append(head + f"failed: {r['error'][:80]} | | |")
        else:
            lines.append(head + f"{r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes'] / 1024:.1f} |")
    failed = [r for r in records if r["error"]]
    spilled = [r for r in records if not r["error"] and r["spill_bytes"]]
    lines += ["", f"{len(records)} compiles: {len(failed)} failed, {len(spilled)} spill "
              "registers."]
    return "\n".join(lines) + "\n"


def _tiling(record: dict) -> str:
    tiling = record["tiling"]
    return tiling if tiling == "default" else ", ".join(f"{k}={v}" for k, v in tiling.items())


def render_markdown(records: list[dict]) -> str:
    first = records[0]
    lines = [
        "# The GPU kernels' Triton programs compiled for an H100 (static)",
        "",
        f"Compiled on a machine without a GPU (commit {first['commit']}, {first['date']}): "
        f"jax {first['jax_version']} lowering, triton {first['triton_version']}, "
        f"`ptxas -v` for {TARGET}. Registers per thread, spilled bytes, shared memory per "
        "program, programs one multiprocessor holds at once (by registers, shared memory and "
        "threads), "
        "and Hopper's `wgmma` / Ampere-style `mma.sync` tensor-core instructions in the PTX. "
        "No timings: those are `kernels-<device>.md`'s and `matvec-<device>.md`'s.",
        "",
        "| batch | context | T | tiling | program | grid | warps | stages | registers | "
        "spills (B) | shared (KiB) | per SM | wgmma | mma.sync | async copies |",
        "|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def resources(r: dict, empty: int) -> str:
        if r["error"]:
            return f"failed: {r['error'][:80]} |" + " |" * empty
        return (f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                f"{r['programs_per_core']} | {r['wgmma']} | {r['mma_sync']} | "
                f"{r['async_copies']} |")

    for r in records:
        if r.get("kernel", "tree_attention") == "tree_attention":
            lines.append(f"| {r['batch']} | {r['context']} | {r['T']} | {_tiling(r)} | "
                         f"{r['program']} | {'x'.join(map(str, r['grid']))} | "
                         f"{r['num_warps']} | {r['num_stages']} | " + resources(r, 6))
    products = [r for r in records if r.get("kernel") == "matvec"]
    if products:
        lines += ["", "Decode's matrix-vector products (`jaxdec.pallas_kernels.matvec`, the "
                  "matvec benchmark's cases and tilings):", "",
                  "| projection | rows | K x N | tiling | grid | warps | stages | registers | "
                  "spills (B) | shared (KiB) | per SM | wgmma | mma.sync | async copies |",
                  "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in products:
            shape = f"{r['K']} x {r['N']}"
            if r.get("groups", 1) > 1:
                shape = f"{r['groups']} x {shape}"
            lines.append(f"| {r['projection']} | {r['rows']} | {shape} | "
                         f"{_tiling(r)} | {'x'.join(map(str, r['grid']))} | "
                         f"{r['num_warps']} | {r['num_stages']} | " + resources(r, 6))
    spilled = [r for r in records if not r["error"] and r["spill_bytes"]]
    failed = [r for r in records if r["error"]]
    lines += ["", f"{len(records)} programs: {len(failed)} failed to compile, "
              f"{len(spilled)} spill registers."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench import kernels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="h100", choices=sorted(kernels.PRESETS),
                        help="a bench/kernels.py preset (files of other presets than h100 "
                             "name it: ptx-sm_90a-<preset>.json)")
    parser.add_argument("--out", type=out_dir, default=Path(__file__).parent / "results")
    parser.add_argument("--mosaic", action="store_true",
                        help="the Hopper (Mosaic GPU) kernel instead, compiled by jax's own "
                             "pipeline: needs jax >= 0.11 and the CUDA plugin (no GPU); "
                             "writes mosaic-sm_90a.json/.md")
    args = parser.parse_args(argv)
    if args.mosaic:
        reason = mosaic_unavailable()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        return _write(args.out, "mosaic", args.preset, run_mosaic(args.preset),
                      render_mosaic_markdown)
    if importlib.util.find_spec("triton") is None:
        print("needs the triton package (pip install triton): it compiles the kernels' "
              "Triton IR for sm_90a", file=sys.stderr)
        return 2
    return _write(args.out, "ptx", args.preset, run(args.preset), render_markdown)


def output_stem(name: str, preset: str) -> str:
    """`<name>-sm_90a` for the h100 preset (the committed report), `<name>-sm_90a-<preset>`
    for another, so a small preset's run never replaces it."""
    return f"{name}-{TARGET}" + ("" if preset == "h100" else f"-{preset}")


def _write(out: Path, name: str, preset: str, records: list[dict], render) -> int:
    """`output_stem`.json and its Markdown under `out`, each replaced whole, the table
    printed too; the exit status: 1 when a compile failed."""
    out.mkdir(parents=True, exist_ok=True)
    table = render(records)
    stem = output_stem(name, preset)
    replace_text(out / f"{stem}.json", json.dumps(records, indent=1) + "\n")
    replace_text(out / f"{stem}.md", table)
    print(table)
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
