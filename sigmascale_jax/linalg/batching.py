"""Mapping a function over stacks of same-shape matrices: `jax.vmap`, except where XLA:CPU deadlocks.

jaxlib 0.10.2's CPU LAPACK kernels (SVD, triangular solve, ...) split a *batched*
call into chunks, queue them on XLA's intra-op thread pool and block until they
finish. When the thunk executor runs as many independent batched LAPACK calls at
once as the pool has threads (2 on a 2-core machine), every pool thread waits for
chunks that no thread is left to run: the process hangs with all threads asleep.
SigmaScale's block loss holds four independent groups of SVDs, so on CPU it hung
on SmolLM2 after the first few steps. Unbatched calls run inline, so on CPU the
map is unrolled into one call per matrix; on GPU/TPU it is a real `vmap`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def unroll_on_cpu() -> bool:
    """Whether `stacked_map` unrolls (decided when tracing: the default backend is CPU)."""
    return jax.default_backend() == "cpu"


def stacked_map(fn: Callable[..., Any], in_axes: Sequence[int | None]) -> Callable[..., Any]:
    """`jax.vmap(fn, in_axes)` on accelerators; on CPU, `fn` on each slice, results stacked.

    Only leading axes (0) or None (broadcast) are supported; outputs are stacked
    along a new leading axis, as vmap does.
    """
    if any(ax not in (0, None) for ax in in_axes):
        raise ValueError(f"stacked_map supports in_axes of 0 or None, got {tuple(in_axes)}")

    def mapped(*args: Any) -> Any:
        if not unroll_on_cpu():
            return jax.vmap(fn, in_axes=tuple(in_axes))(*args)
        sizes = {jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0}
        if len(sizes) != 1:
            raise ValueError(f"mapped arguments need one common leading size, got {sorted(sizes)}")
        (size,) = sizes
        outs = [
            fn(*[jax.tree.map(lambda x: x[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)])
            for i in range(size)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return mapped
