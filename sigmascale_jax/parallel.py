"""A device mesh with one `data` axis, and sharding as data: which arrays split along it.

Calibration and evaluation windows split over the `data` axis: every chunk of windows
passed to a jit-compiled function is placed with its leading (window) axis sharded
over the mesh, and XLA partitions the computation and inserts the reductions (a Gram
matrix sums over tokens, a loss over windows). Weights stay replicated. Without a
mesh (one device) nothing is placed: the code path is the single-device one, bit
for bit.

    mesh = make_mesh("data=8")            # or None: every local device; "data=1": no mesh
    x = shard(x, mesh, "windows")         # [N, ...] split over data when N divides evenly
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sigmascale_jax.errors import UserError

# What splits along the data axis: a name per kind of array, its PartitionSpec (rules as data).
RULES: dict[str, PartitionSpec] = {
    "windows": PartitionSpec("data"),  # [N, ...]: calibration / evaluation windows, activations, targets
    "replicated": PartitionSpec(),  # weights, statistics
}


def parse_mesh(spec: str | None) -> int:
    """The data-axis size of `--mesh data=N` (None: all local devices)."""
    if spec is None:
        return jax.local_device_count()
    name, _, size = spec.partition("=")
    if name.strip() != "data" or not size.strip().isdigit() or int(size) < 1:
        raise UserError(f"--mesh takes data=N with N ≥ 1 (one data axis), got {spec!r}")
    n = int(size)
    if n > jax.local_device_count():
        raise UserError(f"--mesh data={n}: only {jax.local_device_count()} local devices")
    return n


def make_mesh(spec: str | None = None) -> Mesh | None:
    """A one-axis `data` mesh over the first N local devices, or None for one device."""
    n = parse_mesh(spec)
    if n == 1:
        return None
    return Mesh(jax.local_devices()[:n], ("data",))


def sharding(rows: int, mesh: Mesh, rule: str = "windows") -> NamedSharding:
    """Where an array with `rows` leading rows goes by `RULES[rule]` on `mesh` (replicated unless they split
    evenly)."""
    spec = RULES[rule]
    if spec and rows % mesh.shape["data"]:
        spec = PartitionSpec()  # an uneven last chunk runs replicated: right, only not split
    return NamedSharding(mesh, spec)


def shard(x: Any, mesh: Mesh | None, rule: str = "windows") -> Any:
    """`x` placed by `RULES[rule]` on `mesh` (replicated if its leading axis does not split evenly); on the default
    device without a mesh. An explicit transfer: allowed where `jax.transfer_guard("disallow")` holds."""
    if mesh is None:
        return jax.device_put(x)
    return jax.device_put(x, sharding(x.shape[0], mesh, rule))


def device_chunks(xs: Any, size: int, mesh: Mesh | None) -> list[jax.Array]:
    """`xs: [N, ...]` cut into chunks of `size` rows (the last may be shorter), placed on the device(s) in one call.

    Each chunk is split over `mesh`'s data axis as `shard` places it. The data moves once, before a loop over the
    chunks, which then runs under `jax.transfer_guard("disallow")` with nothing left to move.
    """
    pieces = [np.asarray(xs[s : s + size]) for s in range(0, len(xs), size)]
    if mesh is None:
        return jax.device_put(pieces)
    return jax.device_put(pieces, [sharding(len(p), mesh) for p in pieces])


def on_device(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` on the device, or replicated over `mesh`: weights placed once, before a loop uses them."""
    return jax.device_put(tree) if mesh is None else replicate(tree, mesh)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` copied to every device of `mesh` (weights beside sharded windows); unchanged without one."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, RULES["replicated"]))
