"""Meshes and sharding rules.

Every model function is written per shard (local heads, explicit collectives over the `tp`
axis) and runs under `jax.shard_map` over a mesh with axes ("dp", "tp"): `tp` splits
attention heads, the MLP width and the vocabulary; `dp` splits the batch. One device is a
mesh of size 1, so there is one code path.

Arrays carry logical axis names (e.g. ("embed", "q_heads", "head_dim")); `rules` maps each
name to a mesh axis for a given model and mesh.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxdec.checks import check_int

TP = "tp"
DP = "dp"
_MESH_AXES = (DP, TP)


def make_mesh(tp: int = 1, dp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("dp", "tp") mesh over the first dp * tp devices.

    Args:
      tp: tensor-parallel degree (heads, MLP width and vocabulary are split tp ways).
      dp: data-parallel degree (the batch is split dp ways).
      devices: the devices to use, default `jax.devices()`; with several processes
        (`jax.distributed`), this process's own (`jax.local_devices()`) where they suffice,
        so that no process is handed a mesh of another's devices alone.
    """
    tp, dp = check_int("tp", tp), check_int("dp", dp)
    if devices is not None:
        given = devices
        try:  # (one device, not in a list, is not iterable)
            devices = None if isinstance(devices, (str, bytes)) else list(devices)
        except TypeError:
            devices = None
        if devices is None or not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError(f"devices must be a sequence of jax devices (jax.devices()), got "
                            f"{given!r}")
        if not devices:
            raise ValueError("devices is empty: give at least dp * tp devices")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices lists a device more than once: {devices}")
    if devices is None:
        local = jax.process_count() > 1 and dp * tp <= jax.local_device_count()
        devices = jax.local_devices() if local else jax.devices()
    devices = list(devices)
    if dp * tp > len(devices):
        asked = f"tp={tp}" if dp == 1 else f"dp={dp}" if tp == 1 else \
            f"dp * tp = {dp} * {tp} = {dp * tp}"
        raise ValueError(f"{asked} exceeds the {len(devices)} available devices")
    grid = np.array(devices[: dp * tp], dtype=object).reshape(dp, tp)
    mine = jax.process_index()
    if jax.process_count() > 1 and all(d in jax.devices() for d in grid.flat) and not any(
            d.process_index == mine for d in grid.flat):
        raise ValueError(
            f"the mesh's devices are all other processes' (process {mine} has none of them): "
            "every process runs a mesh's programs on its own devices in it; pass devices "
            "that include this process's (jax.local_devices(), or the processes' together)")
    return Mesh(grid, _MESH_AXES)


class ProcessFailed(RuntimeError):
    """Another process of a multi-process run (`jax.distributed`) failed: its output says
    why. Raised in the others where they would otherwise wait for it in a collective."""


def from_every_process(value: int) -> np.ndarray:
    """Every process's int32 `value`, in process order (a collective: all must call it;
    with one process, just `value`)."""
    if jax.process_count() == 1:
        return np.array([value], np.int32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


@contextlib.contextmanager
def together(what: str):
    """Runs the block in every process of a multi-process run, then has them agree on it: an
    error in one (a file its host lacks, say) raises there, and `ProcessFailed` in the
    others, at the block's end, instead of that process exiting while the others wait for it
    in jax's next collective (minutes, then jax's traceback; or for ever). The block must
    not itself run collectives. With one process: the block alone."""
    if jax.process_count() == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (re-raised below, once the others know)
        error = e
    failed = from_every_process(error is not None)
    if error is not None:
        raise error
    if failed.any():
        raise ProcessFailed(f"process {int(np.argmax(failed))} failed while {what} (its "
                            "output says why)")


def check_same_everywhere(value: bytes, what: str,
                          advice: str = "every process must give the same") -> None:
    """A ValueError in every process of a multi-process run unless all hold the same
    `value` (compared by checksum): each process places its own part of a program's inputs,
    so inputs that differ between them compute nonsense, silently."""
    if jax.process_count() == 1:
        return
    import zlib

    digests = from_every_process(zlib.crc32(value) - 2**31)
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{what} differs between processes (process 0's and those of "
                         f"processes {differ}): {advice}")


def put_on_mesh(array, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (numpy, or anything numpy reads) placed with `sharding`, which may span
    other processes' devices (a multi-process mesh, `jax.distributed`): each process places
    its own devices' parts, so every process must pass the same array."""
    if sharding.is_fully_addressable:
        return jax.device_put(array, sharding)
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def onto_mesh(x: jax.Array, mesh: Mesh) -> jax.Array:
    """`x` (a small array: a key) replicated over `mesh` where it lies on a device outside it
    (another model's) or on another mesh (one made under a caller's `jax.set_mesh` carries
    that mesh in its type in newer jax): a program over the mesh refuses such an argument.
    In one process, replicated over `mesh` wherever it lies (one compiled program whatever
    the key's placement)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or not _runs_here(mesh):
        return x
    sharding, replicated = x.sharding, NamedSharding(mesh, P())
    if not sharding.device_set <= set(mesh.devices.flat) or (
            isinstance(sharding, NamedSharding) and sharding.mesh != mesh):
        return jax.device_put(x, replicated)
    # In one process, always the one placement: a program's inputs' placements are part of
    # what it was compiled for (a key made by jax.random.key, one device_put on a device and
    # one on the mesh compiled three programs).
    if mesh.devices.size == len(mesh.local_devices) and sharding != replicated:
        return jax.device_put(x, replicated)
    return x


def host_callback(function: Callable, mesh: Mesh, *args, ordered: bool = False) -> None:
    """`jax.debug.callback(function, *args)` inside a program over `mesh`, its array
    arguments first gathered whole over the mesh (an all-gather XLA plans; it otherwise
    moved each dp-split array to one device itself and warned of an "involuntary full
    rematerialization" at every compile)."""
    if mesh.size > 1:
        whole = NamedSharding(mesh, P())
        args = tuple(jax.lax.with_sharding_constraint(a, whole) if isinstance(a, jax.Array)
                     else a for a in args)
    jax.debug.callback(function, *args, ordered=ordered)


def _runs_here(mesh: Mesh) -> bool:
    """Whether `mesh`'s devices are this runtime's (not a topology's that programs are only
    compiled for: `jaxdec.abstract_model`'s TPU meshes on a CPU machine, say)."""
    device = mesh.devices.flat[0]
    try:
        return device in jax.devices(device.platform)
    except RuntimeError:  # no such backend here
        return False


def to_host(x) -> np.ndarray:
    """An array's whole value as numpy on this process, also where it is split over other
    processes' devices (a multi-process mesh): its parts are then gathered from every process
    (a collective: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def resolve_mesh(mesh: Mesh | None) -> Mesh:
    """`mesh`, or a one-device mesh when None; rejects meshes with axes we do not know. A
    mesh without a "tp" axis gets one of size 1 (the model's collectives name it)."""
    if mesh is None:
        return make_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in _MESH_AXES]
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} are not understood; jaxdec meshes use the axes {_MESH_AXES} "
            "(a missing axis counts as size 1)"
        )
    devices, names = mesh.devices, mesh.axis_names
    if TP not in names:
        devices, names = devices[..., None], (*names, TP)
    if len(set(devices.flat)) != devices.size:
        raise ValueError(f"mesh lists a device more than once: {list(devices.flat)}")
    # jaxdec's programs shard by hand (shard_map, explicit shardings): its axes are Auto.
    # A mesh of Explicit axes (jax.make_mesh's default) is the same devices.
    if names != mesh.axis_names or any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
    return mesh


def runs_on_model_mesh(mesh_of: Callable[[dict], Any]):
    """Decorator for jaxdec's entry points: where the caller set a context mesh of their own
    (`jax.set_mesh`), the call runs with the model's mesh as the context instead; the model's
    programs name their own mesh, which the context's must match. `mesh_of` gets the call's
    bound arguments and returns the model's mesh (a Model's or a `mesh=` argument's; None:
    one device). Inside `jax.jit` the context cannot change: a different one is an error
    naming both."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if jax.sharding.get_abstract_mesh().empty:
                return fn(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                mesh = resolve_mesh(mesh_of(bound.arguments))
            except Exception:  # (the call itself names what is wrong)
                return fn(*args, **kwargs)
            with _model_mesh_context(mesh, fn.__qualname__):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


@contextlib.contextmanager
def _model_mesh_context(mesh: Mesh, caller: str):
    if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        get_mesh = getattr(jax.sharding, "get_mesh", None)  # (jax >= 0.10's)
        try:
            same = get_mesh is None or get_mesh() == mesh
        except ValueError:  # inside jax.jit, where the abstract mesh is what counts
            same = True
        if same:
            yield
            return
    try:
        manager = jax.set_mesh(mesh)
        manager.__enter__()
    except ValueError:  # inside jax.jit: the context stays the caller's
        manager = None
    if manager is None:
        context = jax.sharding.get_abstract_mesh()
        if getattr(context, "manual_axes", ()):
            raise ValueError(
                f"{caller} cannot run inside a shard_map (here over the manual axes "
                f"{tuple(context.manual_axes)}): it runs its own over its model's mesh; call "
                "it outside the shard_map (under jax.jit is fine)")
        if context != mesh.abstract_mesh:
            raise ValueError(
                f"{caller} runs on its model's mesh {dict(mesh.shape)}, but is traced under "
                f"jax.jit with another context mesh ({jax.sharding.get_abstract_mesh()}): set "
                "the model's mesh around the jitted call (with jax.set_mesh(model.mesh): ...), or "
                "call it outside the other mesh's context")
        yield  # (the same shape: what the programs check)
        return
    try:
        yield
    finally:
        manager.__exit__(None, None, None)


def platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what kernels the models
    pick for a model on it (not `jax.default_backend()`, which may be another)."""
    return mesh.devices.flat[0].platform


def axis_size(mesh: Mesh, name: str) -> int:
    return dict(zip(mesh.axis_names, mesh.devices.shape)).get(name, 1)


def tp_size(mesh: Mesh) -> int:
    return axis_size(mesh, TP)


def dp_size(mesh: Mesh) -> int:
    return axis_size(mesh, DP)


def check_divisibility(config, mesh: Mesh) -> None:
    """Raises a ValueError naming `tp` when the model cannot be split over the mesh's tp axis."""
    check_tp_split(config, tp_size(mesh))


def check_tp_split(config, tp: int) -> None:
    """Raises a ValueError naming `tp` when the model cannot be split tp ways."""
    if config.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide the model's {config.num_heads} attention heads")
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(
            f"tp={tp} and the model's {kv} KV heads must divide one another (KV heads are split "
            "when tp divides them and replicated when they divide tp)"
        )
    if config.intermediate_size % tp:
        raise ValueError(
            f"tp={tp} does not divide the model's intermediate_size={config.intermediate_size}"
        )


def cache_kv_heads(config, mesh: Mesh) -> int:
    """KV heads in the cache: the model's, or one per tp shard when they are replicated."""
    return max(config.num_kv_heads, tp_size(mesh))


def padded_vocab(config, mesh: Mesh) -> int:
    """Vocabulary rounded up to a multiple of tp (vocab-parallel embedding and logits)."""
    tp = tp_size(mesh)
    return -(-config.vocab_size // tp) * tp


def rules(mesh: Mesh, config) -> dict[str, str | None]:
    """Logical axis name -> mesh axis (or None: replicated) for this model on this mesh."""
    has = set(mesh.axis_names)
    tp = TP if TP in has else None
    return {
        "batch": DP if DP in has else None,
        "vocab": tp,
        "embed": None,
        "q_heads": tp,
        "kv_groups": tp,  # max(K, tp) groups of the fused qkv projection: whole groups a shard
        "qkv_slot": None,
        "qkv_columns": tp,  # the flat qkv weight's R (H/R + 2) D columns: whole groups a shard
        "cache_heads": tp,
        "head_dim": None,
        "gate_up": None,
        "mlp": tp,
        "cache_seq": None,
        "seq": None,
    }


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def spec(axes: tuple[str | None, ...], axis_rules: dict[str, str | None]) -> P:
    """PartitionSpec for one array's logical axes; a mesh axis may appear only once."""
    mapped = []
    for name in axes:
        if name is not None and name not in axis_rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        mapped.append(None if name is None else axis_rules[name])
    used = [a for a in mapped if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {axes} map mesh axis twice: {mapped}")
    return P(*mapped)


def specs(mesh: Mesh, axes_tree: Any, config) -> Any:
    """PartitionSpecs for a pytree of logical axes (same structure)."""
    axis_rules = rules(mesh, config)
    return jax.tree.map(lambda a: spec(a, axis_rules), axes_tree, is_leaf=_is_axes)


def shardings(mesh: Mesh, axes_tree: Any, config) -> Any:
    """NamedShardings for a pytree of logical axes (same structure)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs(mesh, axes_tree, config),
        is_leaf=lambda x: isinstance(x, P),
    )
