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
from sigmascale_jax.io.checkpoint import matrix_records
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class FromRunSettings(Settings):
    ranks_from: str = setting(None, "from-run: a compressed folder (or its compression.json) whose ranks to reuse",
                              reads="the run that supplies the ranks")


def _report_path(ranks_from: str | None) -> Path:
    if not ranks_from:
        raise UserError("--ranks from-run needs --ranks-from RUN (a folder made by sigmascale_jax.compress)")
    path = Path(ranks_from)
    return path / "compression.json" if path.is_dir() else path


def read_run_ranks(ranks_from: str | None, cfg: ModelConfig, ratio: float) -> tuple[Ranks, dict, dict]:
    """`ranks[block][projection]` (None: dense) from a compressed run's report, the report and its validated
    matrix records (`matrix_records`); checked against the model's shapes and the run's `ratio`."""
    from sigmascale_jax.io.fileio import read_json

    path = _report_path(ranks_from)
    if not path.is_file():
        raise UserError(f"--ranks-from {ranks_from}: no compression.json there; give a folder made by "
                        "sigmascale_jax.compress")
    report = read_json(path)
    if not isinstance(report, dict):
        raise UserError(f"{path} is not a compression report (a JSON object); give a compression.json written by "
                        "sigmascale_jax.compress")
    recorded = report.get("ratio_requested")
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0 < recorded < 1:
        raise UserError(f"{path}: ratio_requested is {recorded!r}, not a ratio in (0, 1); the report is damaged")
    records = matrix_records(report, cfg, path)
    if abs(float(recorded) - ratio) > 1e-9:
        raise UserError(f"{path} was compressed at --ratio {recorded}; pass that --ratio to reuse its ranks")
    ranks: Ranks = [{n: None if records[i, n]["dense"] else records[i, n]["rank"] for n in PROJECTIONS}
                    for i in range(cfg.num_layers)]
    return ranks, report, records


def _stored(records: dict, cfg: ModelConfig, budget: Budget) -> int:
    shapes = cfg.projection_shapes()
    return sum(budget.stored(*shapes[n], None if m["dense"] else m["rank"]) for (_, n), m in records.items())


def own_budget(report: dict, ratio: float) -> Budget | None:
    """The budget the report's own encoding counts with (None: an encoding this version does not know)."""
    from sigmascale_jax.compress.plan import ENCODERS, load_methods

    load_methods()
    encode = report.get("encode") if isinstance(report.get("encode"), dict) else {}
    name = encode.get("name", report.get("encoding") or "plain")
    if not isinstance(name, str) or name not in ENCODERS:
        return None
    return Budget(ratio, ENCODERS[name].build().count)


@register(ALLOCATORS, "from-run", FromRunSettings, "the ranks of an earlier compressed run (--ranks-from RUN)")
def from_run(ranks_from: str | None = None) -> RankAllocator:
    settings = FromRunSettings(ranks_from=ranks_from)

    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        ranks, report, records = read_run_ranks(ranks_from, ctx.cfg, budget.ratio)
        path = _report_path(ranks_from)
        if any("stored" not in m for m in records.values()):
            raise UserError(f"{path} does not say what each matrix stores ('stored'); the report is damaged")
        encoding = (report.get("encode") or {}).get("name", report.get("encoding"))
        own = own_budget(report, budget.ratio)
        if own is None:
            raise UserError(f"{path} names encoding {encoding!r}, which this version does not know; the report is "
                            "damaged or from another version")
        for (i, n), m in records.items():  # the report against itself first: an edited rank is not an encoding
            if int(m["stored"]) != own.stored(*m["shape"], None if m["dense"] else m["rank"]):
                raise UserError(f"{path}: block {i} {n} records rank {m.get('rank')} but stores {m['stored']} numbers, "
                                f"which its encoding {encoding} does not give that rank; the report was edited or is "
                                "damaged")
        stored, recorded = _stored(records, ctx.cfg, budget), _stored(records, ctx.cfg, own)
        if stored != recorded:  # each encoding counts a rank-k matrix differently: its ranks fit its own budget
            raise UserError(f"the ranks of {ranks_from} store {recorded} numbers with its --encoding {encoding}, "
                            f"{stored} with this run's; pass --encoding {encoding} (and its settings) to reuse them")
        source = {k: v for k, v in (report.get("allocate") or {}).items() if k != "trace"}
        return Allocation(ranks, {"ranks_from": str(path.resolve()), "report_sha1":
                                  hashlib.sha1(path.read_bytes()).hexdigest(), "source_allocate": source,
                                  "source_method": report.get("method"), "source_model": report.get("model"),
                                  "matrices_dense": sum(k is None for block in ranks for k in block.values())})

    def check(spec, cfg) -> None:
        read_run_ranks(ranks_from, cfg, spec.ratio)  # a wrong RUN fails before any work

    return RankAllocator("from-run", settings, allocate, check, costly=False)
