"""compression.json: what was done, with what, at which ranks, and what it cost."""

from __future__ import annotations

import importlib.metadata
import os
import re
import resource
import sys
from typing import Any


from sigmascale_jax.compress.plan import Allocation, BlockResult, Budget, Plan, RunSpec
from sigmascale_jax.linalg.precision import resolve_precision
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compile, with its seconds


class CompileCounter:
    """XLA compiles in this process from its creation on, counted from JAX's own monitoring events: `total()`,
    `snapshot()`, `since(snapshot) -> (compiles, seconds)`; `close()` stops listening. A cached program (the
    persistent compilation cache) is no compile: it sends no such event."""

    def __init__(self) -> None:
        import jax

        self.count, self.seconds = 0, 0.0

        def listen(event: str, duration: float, **kwargs: Any) -> None:
            if event == COMPILE_EVENT:
                self.count += 1
                self.seconds += duration

        self._listener = listen
        jax.monitoring.register_event_duration_secs_listener(listen)

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds

    def since(self, snapshot: tuple[int, float]) -> tuple[int, float]:
        return self.count - snapshot[0], self.seconds - snapshot[1]

    def close(self) -> None:
        import jax

        try:
            jax.monitoring.unregister_event_duration_listener(self._listener)
        except (AssertionError, ValueError):  # already removed
            pass


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "sigmascale_jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_memory(stage_peaks: dict[str, int] | None = None, start_rss: int | None = None) -> dict[str, Any]:
    """Peak host RSS of this process, where the backend reports it peak device memory (MiB), and where the OS
    reports them (Linux) each stage's resident peak and the resident size when the run began."""
    import jax

    mem: dict[str, Any] = {"host_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    if stage_peaks:
        mem["stage_rss_peak_mib"] = {k: round(v / 2**20, 1) for k, v in stage_peaks.items()}
        # measuring them reset the kernel's mark that ru_maxrss reads: the run's peak is the largest of them
        mem["host_peak_mib"] = max(mem["host_peak_mib"], max(stage_peaks.values()) / 2**20)
    if start_rss is not None:
        mem["start_rss_mib"] = round(start_rss / 2**20, 1)
    return mem


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, where the OS says (else None)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        return None


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def resident_high_water(reset: bool = False) -> int | None:
    """The most resident memory this process has held (Linux's VmHWM) since it began or since the last reset;
    `reset=True` then lowers the mark to the present size, so the next call sees one stage's peak alone.
    None where the OS does not say."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        if m is None:
            return None
        if reset:
            with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
                f.write("5")
        return int(m.group(1)) * 1024
    except OSError:
        return None


def rank_summary(cfg: ModelConfig, ranks: list[dict]) -> dict[str, dict[str, Any]]:
    """Per projection: its shape, `rank` when every block shares one (else None), and min / max / mean / dense blocks."""
    out = {}
    for n in PROJECTIONS:
        m, k_full = cfg.projection_shapes()[n], min(cfg.projection_shapes()[n])
        ks = [r[n] for r in ranks]
        eff = [k_full if k is None else k for k in ks]
        out[n] = {
            "shape": list(m),
            "rank": ks[0] if len(set(ks)) == 1 and ks[0] is not None else None,
            "min": min(eff), "max": max(eff), "mean": sum(eff) / len(eff),
            "dense_blocks": sum(k is None for k in ks),
        }
    return out


def matrix_bytes(leaf: Any, store_dtype: str = "float32") -> int:
    """Bytes a projection's matrices take with float tensors stored as `store_dtype` (its bias aside: that is
    counted with the model's other parameters)."""
    from sigmascale_jax.model.leaves import stored_bytes

    return stored_bytes(leaf, store_dtype) - (0 if leaf.bias is None else stored_bytes(leaf.bias, store_dtype))


def build_report(spec: RunSpec, plan: Plan, cfg: ModelConfig, alloc: Allocation, results: list[BlockResult],
                 refined: list[dict], budget: Budget, leaves: list[dict], *, counts: dict, calibration: dict,
                 resumed: bool, timings: dict, seconds: float, stage_peaks: dict | None = None,
                 start_rss: int | None = None, compiles: dict | None = None) -> dict[str, Any]:
    """compression.json. `counts`: `model_dense` (all parameters), `other` (those outside the projections'
    matrices: embeddings, norms, head, biases) and `other_bytes` (their bytes as stored; float32 where absent)."""
    from sigmascale_jax.io.checkpoint import FORMAT_VERSION

    shapes = cfg.projection_shapes()
    triples = [(*shapes[n], alloc.ranks[i][n]) for i in range(cfg.num_layers) for n in PROJECTIONS]
    dense = sum(m * n for m, n, _ in triples)
    stored = sum(budget.stored(m, n, k) for m, n, k in triples)
    enc = plan.encoder()
    from sigmascale_jax.compress.encode.quant import store_rules

    store_dtype = store_rules(enc)[1]
    mat_bytes = {(i, n): matrix_bytes(leaves[i][n], store_dtype) for i in range(cfg.num_layers) for n in PROJECTIONS}
    model_compressed = counts["other"] + stored
    bytes_dense, bytes_stored = 4 * dense, sum(mat_bytes.values())
    other_bytes = counts.get("other_bytes", 4 * counts["other"])  # embeddings, head, norms, biases as stored
    fz = plan.factorize
    settings = fz.settings.asdict()
    return {
        "format_version": FORMAT_VERSION,
        "model": spec.model,
        "model_config": cfg.to_dict(),
        "method": fz.name,
        "ranks_method": plan.allocate.name,
        "factorize": {"name": fz.name, **settings},
        "allocate": {"name": plan.allocate.name, **plan.allocate.settings.asdict(), **alloc.info},
        "refine": refined,
        # flat copies kept for readers of format 1 reports
        "update": settings.get("update", False),
        "sequential": spec.sequential,
        "precision": resolve_precision(spec.precision),
        "alpha": settings.get("alpha"),
        "sigmascale": None, **({fz.name: settings} if fz.flat_record else {}),
        "encoding": enc.name,
        "encode": {"name": enc.name, **enc.settings.asdict()},
        "ratio_requested": spec.ratio,
        "ratio_achieved": 1.0 - stored / dense,
        "whole_model_ratio": 1.0 - model_compressed / counts["model_dense"],
        "byte_ratio": 1.0 - bytes_stored / bytes_dense,
        "whole_model_byte_ratio": 1.0 - (other_bytes + bytes_stored) / (4 * counts["model_dense"]),
        "params": {
            "compressible_dense": dense,
            "compressible_compressed": stored,
            "model_dense": counts["model_dense"],
            "model_compressed": model_compressed,
        },
        "bytes": {
            "compressible_dense": bytes_dense,
            "compressible_compressed": bytes_stored,
            "model_dense": 4 * counts["model_dense"],
            "model_compressed": other_bytes + bytes_stored,
            "other": other_bytes,
        },
        "ranks": rank_summary(cfg, alloc.ranks),
        "matrices": [{"block": i, "name": n, **r.matrices[n], **enc.record(),
                      "stored": budget.stored(*shapes[n], alloc.ranks[i][n]), "bytes": mat_bytes[(i, n)]}
                     for i, r in enumerate(results) for n in PROJECTIONS],
        "blocks": [{"block": i, **r.block} for i, r in enumerate(results) if r.block],
        "calibration": calibration,
        "resumed": resumed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # XLA compiles per stage beside its wall seconds: a stage's fixed cost (a cached program is no compile)
        "compile": compiles or {},
        "seconds": round(seconds, 3),
        "memory": peak_memory(stage_peaks, start_rss),
        "versions": versions(),
    }
