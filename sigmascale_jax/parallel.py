"""A `(data, model)` device mesh, and sharding as data: which axis of which array splits over which mesh axis.

Calibration and evaluation windows split over the `data` axis; weights and factors split
over the `model` axis (attention heads, MLP width, vocabulary), so a big model needs no
full replica per device. Each array gets *logical* axis names from where it sits in the
params tree (`PROJECTION_AXES`, `FIELD_AXES`, `TOP_AXES`), and `LOGICAL_RULES` maps logical
names to mesh axes, as MaxText's logical axis rules do. Arrays are placed with those
shardings before a jit-compiled function runs, and XLA partitions the computation and
inserts the collectives (a Gram matrix sums over tokens, a projection's output gathers
over heads). Without a mesh (one device) arrays go to the default device: the
single-device code path, bit for bit.

    mesh = make_mesh("data=2,model=4")        # None (all local devices on data), "data=1": no mesh
    x = shard(x, mesh, "windows")             # [N, ...] split over data when N divides evenly
    params = on_device(params, mesh)          # weights split over model by the rules

Several processes (hosts) run one job with JAX's own multi-controller model: every process
runs the same program, `initialize` joins them (`jax.distributed.initialize`), the mesh
spans every process's devices, each process places the shards of a window batch that its
devices hold, and XLA's collectives (gloo on CPU) reduce Gram matrices, losses and
gradients across them. `fetch` brings any result back to every process's host.

A user's own `Mesh` with other axis names: `Layout(mesh, {"batch": "dp", "heads": "tp", ...})`
wherever a mesh is taken (a plain `Mesh` uses `LOGICAL_RULES` with the axes it has).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sigmascale_jax.errors import UserError

AXES = ("data", "model")  # the command line's mesh axes, in device-grid order

# logical axis -> mesh axis (None: never split)
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",  # windows, activations, targets
    "vocab": "model",  # embedding and LM head rows
    "heads": "model",  # q/k/v outputs, o inputs (heads × head_dim)
    "mlp": "model",  # gate/up outputs, down inputs
    "embed": None,  # the residual stream: every device holds it whole
    "rank": None,  # factor ranks differ per matrix and are small
}

# (out, in) logical axes of each projection's matrix [out, in]
PROJECTION_AXES: dict[str, tuple[str, str]] = {
    "q": ("heads", "embed"), "k": ("heads", "embed"), "v": ("heads", "embed"), "o": ("embed", "heads"),
    "gate": ("mlp", "embed"), "up": ("mlp", "embed"), "down": ("embed", "mlp"),
}

# a projection's arrays by field name, in terms of its matrix's (out, in): B [out, k], C [k, in], PivGa's R
# [k, in - k] (its columns are permuted, so only the rank could split)
FIELD_AXES: dict[str, tuple[str, ...]] = {
    "w": ("out", "in"), "b": ("out", "rank"), "c": ("rank", "in"), "bias": ("out",), "r": ("rank", None),
}

TOP_AXES: dict[str, tuple[str, ...]] = {"embed": ("vocab", "embed"), "lm_head": ("vocab", "embed")}

RULES: dict[str, tuple[str | None, ...]] = {  # kinds of data arrays, by their logical axes
    "windows": ("batch",),  # [N, ...]
    "replicated": (),  # statistics, keys, scalars
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical axis rules that place arrays on it (`rules`: logical name -> mesh axis or None)."""

    mesh: Mesh
    rules: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(LOGICAL_RULES))

    def axis(self, logical: str | None) -> str | None:
        """The mesh axis a logical axis splits over (None when the rules or the mesh have none for it)."""
        name = self.rules.get(logical) if logical else None
        return name if name in self.mesh.axis_names else None

    def size(self, logical: str) -> int:
        """How many ways a logical axis splits (1 when it does not)."""
        name = self.axis(logical)
        return 1 if name is None else int(self.mesh.shape[name])

    def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes: a dimension that does not divide evenly (or
        an axis already used by an earlier dimension) stays whole."""
        names, used = [], set()
        for axis, dim in zip(logical, shape):
            name = self.axis(axis)
            if name is None or name in used or dim % self.mesh.shape[name]:
                name = None
            used.add(name)
            names.append(name)
        while names and names[-1] is None:
            names.pop()
        return PartitionSpec(*names)


def as_layout(mesh: Mesh | Layout | None) -> Layout | None:
    """A `Layout` of a mesh (the default rules), a layout as it is, or None without a mesh."""
    if mesh is None or isinstance(mesh, Layout):
        return mesh
    return Layout(mesh)


def data_size(mesh: Mesh | Layout | None) -> int:
    """How many ways windows split (1 without a mesh)."""
    layout = as_layout(mesh)
    return 1 if layout is None else layout.size("batch")


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`{"data": N, "model": M}` of `--mesh data=N,model=M` (either may be left out: 1; None: every device on data,
    every process's devices in a multi-process run)."""
    if spec is None:
        return {"data": jax.device_count(), "model": 1}
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        size = size.strip()
        if name not in sizes or not (size.isascii() and size.isdigit()) or int(size) < 1:
            raise UserError(f"--mesh takes data=N,model=M with N, M ≥ 1 (either may be left out), got {spec!r}")
        sizes[name] = int(size)
    n = sizes["data"] * sizes["model"]
    if n > jax.device_count():
        raise UserError(f"--mesh {spec}: needs {n} devices, only {jax.device_count()} available")
    return sizes


def make_mesh(spec: str | None = None) -> Mesh | None:
    """A `(data, model)` mesh over the first data × model devices, or None for one device."""
    sizes = parse_mesh(spec)
    n = sizes["data"] * sizes["model"]
    if n == 1:
        return None
    devices = np.asarray(jax.devices()[:n]).reshape(sizes["data"], sizes["model"])
    return Mesh(devices, AXES)


def sharding(rows: int, mesh: Mesh | Layout, rule: str = "windows") -> NamedSharding:
    """Where an array with `rows` leading rows goes by `RULES[rule]` (whole on every device unless they split
    evenly)."""
    layout = as_layout(mesh)
    return NamedSharding(layout.mesh, layout.spec(RULES[rule], (rows,)))


def shard(x: Any, mesh: Mesh | Layout | None, rule: str = "windows") -> Any:
    """`x` placed by `RULES[rule]` on `mesh` (whole on every device if its leading axis does not split evenly); on
    the default device without a mesh. An explicit transfer: allowed where `jax.transfer_guard("disallow")`
    holds."""
    if mesh is None:
        return jax.device_put(x)
    return jax.device_put(x, sharding(x.shape[0], mesh, rule))


def device_chunks(xs: Any, size: int, mesh: Mesh | Layout | None) -> list[jax.Array]:
    """`xs: [N, ...]` cut into chunks of `size` rows (the last may be shorter), placed on the device(s) in one call.

    Each chunk is split over the mesh's data axis as `shard` places it. The data moves once, before a loop over
    the chunks, which then runs under `jax.transfer_guard("disallow")` with nothing left to move.
    """
    pieces = [np.asarray(xs[s : s + size]) for s in range(0, len(xs), size)]
    if mesh is None:
        return jax.device_put(pieces)
    return jax.device_put(pieces, [sharding(len(p), mesh) for p in pieces])


def _key_name(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the array at `path` in a params tree (a block's, the whole model's, or anything holding
    them, such as an optimizer state): a projection's field by `PROJECTION_AXES` and `FIELD_AXES`, the embedding
    and LM head by `TOP_AXES`; anything else (norms, scales, statistics, codes) has none."""
    names = [_key_name(k) for k in path]
    proj = next((n for n in reversed(names) if n in PROJECTION_AXES), None)
    if proj is not None:
        field = next((n for n in names[names.index(proj) + 1 :] if n in FIELD_AXES), None)
        if field is None:
            return ()
        out, inp = PROJECTION_AXES[proj]
        axes = tuple({"out": out, "in": inp}.get(a, a) for a in FIELD_AXES[field])
        if len(axes) == ndim:
            return axes
        # stacked blocks (`stacking.stack_blocks`): a leading layer axis, never split
        stacked = "blocks" in names and not isinstance(names[names.index("blocks") + 1], int)
        return (None, *axes) if stacked and len(axes) + 1 == ndim else ()
    top = names[-1] if names else None
    if top in TOP_AXES and len(TOP_AXES[top]) == ndim:
        return TOP_AXES[top]
    return ()


def param_shardings(tree: Any, mesh: Mesh | Layout) -> Any:
    """A NamedSharding for every array of `tree`, by its logical axes (`logical_axes`) and the layout's rules."""
    layout = as_layout(mesh)

    def one(path, x):
        shape = tuple(np.shape(x))
        return NamedSharding(layout.mesh, layout.spec(logical_axes(path, len(shape)), shape))

    return jax.tree_util.tree_map_with_path(one, tree)


def on_device(tree: Any, mesh: Mesh | Layout | None) -> Any:
    """Every array of `tree` on the device, or on `mesh` by the rules (weights split over `model`, the rest whole
    on every device): placed once, before a loop uses them."""
    return jax.device_put(tree) if mesh is None else jax.device_put(tree, param_shardings(tree, mesh))


CACHE_AXES = (None, "batch", "heads", None, None)  # a KV cache's k and v: [L, B, Hkv, S, hd]


def place_cache(cache: Any, mesh: Mesh | Layout | None) -> Any:
    """A `kvcache.KVCache` on the device, or on `mesh`: rows over data, key/value heads over model."""
    if mesh is None:
        return jax.device_put(cache)
    layout = as_layout(mesh)
    kv = NamedSharding(layout.mesh, layout.spec(CACHE_AXES, cache.k.shape))
    return jax.device_put(cache, type(cache)(kv, kv, NamedSharding(layout.mesh, PartitionSpec())))


# ------------------------------------------------------------------ several processes


JOIN_TIMEOUT = 120.0  # seconds the processes of a run wait for each other before giving up with an error line


def initialize(coordinator: str | None, num_processes: int | None = None, process_id: int | None = None,
               join_timeout: float = JOIN_TIMEOUT) -> None:
    """Join this process to a multi-process run before any device is used.

    `coordinator` "HOST:PORT" with `num_processes` and `process_id` (0 is the coordinator's, and the one that
    writes); "auto": what `jax.distributed.initialize` detects on a cluster (SLURM, Open MPI, TPU pods);
    None: a single process. On CPU the collectives run over gloo. With HOST:PORT the processes first meet on
    PORT + 1 (`rendezvous`), each waiting at most `join_timeout` seconds: a missing process or a wrong address
    is an error line there, not a hang or JAX's abort after its own deadline.
    """
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UserError("--num-processes / --process-id need --coordinator HOST:PORT (or --coordinator auto)")
        return
    if coordinator != "auto":
        host, _, port = coordinator.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65534:
            raise UserError(f"--coordinator takes HOST:PORT with a port in 1..65534 (PORT + 1 is used too), or auto; "
                            f"got {coordinator!r}")
        if num_processes is None or process_id is None:
            raise UserError("--coordinator HOST:PORT needs --num-processes N and --process-id I")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must lie in 0..{num_processes - 1} (--num-processes {num_processes}), "
                            f"got {process_id}")
        rendezvous(host, int(port) + 1, num_processes, process_id, join_timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes talk over it
    try:
        if coordinator == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id,
                                       initialization_timeout=int(max(join_timeout, 1)))
    except (ValueError, RuntimeError) as e:  # e.g. auto off a cluster: nothing to detect
        raise UserError(f"--coordinator {coordinator}: JAX could not join the processes "
                        f"({' '.join(str(e).split())[:200]}); give HOST:PORT with --num-processes and --process-id "
                        "off a cluster") from None


def rendezvous(host: str, port: int, num_processes: int, process_id: int, timeout: float) -> None:
    """Every process of the run is alive and reaches process 0 at `host:port`, or a UserError within `timeout`
    seconds: process 0 listens until the others have called in, then tells each to go on; the others call it
    (retrying while it is not up yet) and wait for the word."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    if num_processes == 1:
        return
    if process_id == 0:
        try:
            server = socket.create_server(("", port), reuse_port=False)
        except OSError as e:
            raise UserError(f"--coordinator: process 0 cannot listen on port {port} (PORT + 1): {e.strerror or e}; "
                            "choose another port") from None
        joined: list[socket.socket] = []
        with server:
            while len(joined) < num_processes - 1:
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    for c in joined:
                        c.close()
                    raise UserError(f"--coordinator: {len(joined)} of the {num_processes - 1} other processes joined "
                                    f"process 0 within {timeout:.0f} s; start them all with the same --coordinator "
                                    "and --num-processes, each with its --process-id") from None
                joined.append(conn)
            for conn in joined:
                with conn:
                    conn.sendall(b"go")
        return
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.01))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"--coordinator {host}:{port - 1}: no process 0 answered within {timeout:.0f} s; start "
                                "process 0 (--process-id 0) with the same --coordinator, or check HOST:PORT") from None
            time.sleep(0.5)
    with conn:
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if conn.recv(2) != b"go":
                raise OSError("closed")
        except OSError:
            raise UserError(f"--coordinator {host}:{port - 1}: process 0 did not see every process within "
                            f"{timeout:.0f} s; start them all") from None


def is_main_process() -> bool:
    """Whether this process writes outputs (process 0; always so in a single-process run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
    """Every array of `tree` as a host numpy array, whole, on every process: an explicit transfer (allowed under
    `jax.transfer_guard("disallow")`). Arrays split over several processes' devices are gathered across them."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)

