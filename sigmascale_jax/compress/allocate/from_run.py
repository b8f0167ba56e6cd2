"""Ranks from an earlier run: the rank of every matrix (or dense) as a compressed folder's `compression.json` records.

Where to cut and how to cut are separate stages, so one costly allocation (the
sensitivity table takes hours on a CPU; FermiGrad learns for minutes) can serve
every factorizer: `--ranks from-run --ranks-from RUN` compares SVD-LLM and
SigmaScale on exactly the same ranks. The earlier run must have been made at the
same `--ratio`, for a model with the same shapes, with the same `--encoding` (each
encoding counts a rank-k matrix differently, so ranks sized for one miss another's
budget).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, Ranks, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class FromRunSettings(Settings):
    ranks_from: str = setting(None, "from-run: a compressed folder (or its compression.json) whose ranks to reuse")


def _report_path(ranks_from: str | None) -> Path:
    if not ranks_from:
        raise UserError("--ranks from-run needs --ranks-from RUN (a folder made by sigmascale_jax.compress)")
    path = Path(ranks_from)
    return path / "compression.json" if path.is_dir() else path


def read_run_ranks(ranks_from: str | None, cfg: ModelConfig, ratio: float) -> tuple[Ranks, dict]:
    """`ranks[block][projection]` (None: dense) from a compressed run's report, and the report; checked against
    the model's shapes and the run's `ratio`."""
    from sigmascale_jax.io.fileio import read_json

    path = _report_path(ranks_from)
    if not path.is_file():
        raise UserError(f"--ranks-from {ranks_from}: no compression.json there; give a folder made by "
                        "sigmascale_jax.compress")
    report = read_json(path)
    matrices = report.get("matrices") if isinstance(report, dict) else None
    if not isinstance(matrices, list):
        raise UserError(f"{path} lists no matrices; give a compression.json written by sigmascale_jax.compress")
    if abs(float(report.get("ratio_requested", -1.0)) - ratio) > 1e-9:
        raise UserError(f"{path} was compressed at --ratio {report.get('ratio_requested')}; pass that --ratio to "
                        "reuse its ranks")
    shapes = cfg.projection_shapes()
    ranks: Ranks = [{} for _ in range(cfg.num_layers)]
    for m in matrices:
        i, name = m.get("block"), m.get("name")
        if not (isinstance(i, int) and 0 <= i < cfg.num_layers and name in shapes):
            raise UserError(f"{path}: matrix {name!r} of block {i!r} does not exist in this model "
                            f"({cfg.num_layers} blocks); the run was made for another architecture")
        if list(m.get("shape", ())) != list(shapes[name]):
            raise UserError(f"{path}: block {i} {name} is {m.get('shape')} there but {list(shapes[name])} in this "
                            "model; the run was made for another model")
        ranks[i][name] = None if m.get("dense") else m.get("rank")
    missing = [(i, n) for i, block in enumerate(ranks) for n in PROJECTIONS if n not in block]
    if missing:
        raise UserError(f"{path} records no rank for {len(missing)} matrices (first: block {missing[0][0]} "
                        f"{missing[0][1]}); the run was made for another model")
    from sigmascale_jax.compress.pipeline import check_ranks  # pipeline imports the allocators

    try:
        return check_ranks(ranks, cfg), report
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


@register(ALLOCATORS, "from-run", FromRunSettings, "the ranks of an earlier compressed run (--ranks-from RUN)")
def from_run(ranks_from: str | None = None) -> RankAllocator:
    settings = FromRunSettings(ranks_from=ranks_from)

    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        ranks, report = read_run_ranks(ranks_from, ctx.cfg, budget.ratio)
        shapes = ctx.cfg.projection_shapes()
        stored = sum(budget.stored(*shapes[n], k) for block in ranks for n, k in block.items())
        recorded = sum(int(m.get("stored", -1)) for m in report["matrices"])
        if stored != recorded:  # each encoding counts a rank-k matrix differently: its ranks fit its own budget
            encoding = (report.get("encode") or {}).get("name", report.get("encoding"))
            raise UserError(f"the ranks of {ranks_from} store {recorded} numbers with its --encoding {encoding}, "
                            f"{stored} with this run's; pass --encoding {encoding} (and its settings) to reuse them")
        source = {k: v for k, v in (report.get("allocate") or {}).items() if k != "trace"}
        path = _report_path(ranks_from)
        return Allocation(ranks, {"ranks_from": str(path.resolve()), "report_sha1":
                                  hashlib.sha1(path.read_bytes()).hexdigest(), "source_allocate": source,
                                  "source_method": report.get("method"), "source_model": report.get("model"),
                                  "matrices_dense": sum(k is None for block in ranks for k in block.values())})

    def check(spec, cfg) -> None:
        read_run_ranks(ranks_from, cfg, spec.ratio)  # a wrong RUN fails before any work

    return RankAllocator("from-run", settings, allocate, check, costly=False)
