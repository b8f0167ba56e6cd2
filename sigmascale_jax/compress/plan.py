"""The three stages of a compression and what passes between them.

Low-rank compression answers two questions per matrix here — where to cut (a rank
allocator) and how to cut (a factorizer) — plus an optional model-level refinement
after the block loop. Each method is a constructor that closes over its settings
and returns a small NamedTuple of pure-ish functions, in the style of optax's
`GradientTransformation`; the pipeline (`pipeline.py`) never names a method.

Methods register themselves in `ALLOCATORS`, `FACTORIZERS` or `REFINERS` from their
own module under `allocate/`, `factorize/` or `refine/`; those packages import every
module they hold, so adding a method is adding a file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.model.config import ModelConfig

Params = dict[str, Any]
MAX_SEED = 2**32 - 1  # a JAX PRNG key holds 32 bits of a seed: larger seeds would repeat smaller ones
Ranks = list[dict[str, Optional[int]]]  # ranks[block][projection]: a rank, or None for a matrix kept dense


def widest_ranks(ranks: Ranks) -> dict[str, int]:
    """The widest rank each projection has in any block (matrices kept dense left out): the width per-block
    training pads factors to, so every block runs one compiled program."""
    widths: dict[str, int] = {}
    for block in ranks:
        for name, k in block.items():
            if k is not None:
                widths[name] = max(widths.get(name, 0), int(k))
    return widths


# ------------------------------------------------------------------ inputs shared by the stages


@dataclasses.dataclass(frozen=True)
class RunSpec(Settings):
    """What every compression needs whatever its methods (the pipeline's own settings)."""

    model: str = setting(None, "HF folder, .gguf file or hub id (required)")
    ratio: float = setting(None, "fraction of the projections' parameters removed (required); 0 keeps every "
                           "projection dense, for --quantize alone", min=0.0, below=1.0)
    calib: str = setting("c4", "c4 (docs 0-999), wikitext2-valid, or a .txt/.jsonl file")
    nsamples: int = setting(64, "calibration windows", min=1)
    seq_len: int = setting(512, "tokens per calibration window", min=2)
    seed: int = setting(0, "seed of the calibration window offsets (and of SigmaScale's minibatches)", min=0,
                        max=MAX_SEED)
    sequential: bool = setting(True, "feed block i+1 from the compressed block i")
    batch_size: int = setting(8, "calibration windows per device call", min=1)
    mesh: str | None = setting(None, "data=N,model=M: split calibration windows over N devices and weights over M "
                                "(default: every local device on data)")
    precision: str | None = setting(None, "float64 or float32: what factorizations (Cholesky, eigh, solves, SVDs) run "
                                    "in (default: float32 on TPU, float64 elsewhere)", choices=("float64", "float32"))


@dataclasses.dataclass
class ModelContext:
    """The model and calibration data, for stages that look at the whole model (allocators, refiners).

    Blocks are loaded on demand (`load_block(i)`: dense params of block i), so an
    allocator that needs only shapes touches no weights.
    """

    cfg: ModelConfig
    outer: Params  # embed, final_norm, lm_head (host arrays)
    load_block: Callable[[int], Params]
    windows: np.ndarray  # [N, T] int32 calibration tokens
    spec: RunSpec
    progress: bool = True
    model_key: dict | None = dataclasses.field(default_factory=dict)  # identifies the weights (None: in memory, uncached)
    mesh: Any = None  # a `parallel.make_mesh` (data, model) mesh or a `parallel.Layout`, or None for one device
    # more windows of a calibration text (None: the run's), disjoint from `windows` where there is room:
    # `(calib, n, seq_len) -> ([n, seq_len], record)`; None in memory, where only `windows` exist
    fresh_windows: Callable[[str | None, int, int], tuple[np.ndarray, dict]] | None = None
    staging: Any = None  # the run's staging folder (a Path) for stages that checkpoint, or None in memory

    @property
    def calib_sha1(self) -> str:
        import hashlib

        return hashlib.sha1(np.ascontiguousarray(self.windows).tobytes()).hexdigest()


class Budget(NamedTuple):
    """How many numbers the projections may store: `(1 − ratio)` of their dense count.

    `count(m, n, k)`: numbers stored for an `m × n` matrix kept at rank k (k(m+n) for
    plain factors); a matrix is never stored at more than its dense `m·n`.
    """

    ratio: float
    count: Callable[[int, int, int], int]

    def stored(self, m: int, n: int, k: int | None) -> int:
        return m * n if k is None else min(m * n, self.count(m, n, k))

    def limit(self, shapes: list[tuple[int, int]]) -> int:
        """Numbers the matrices of `shapes` may store in all (the removal target rounded as ZS-SVD's code does)."""
        dense = sum(m * n for m, n in shapes)
        return dense - int(dense * self.ratio)


def check_reachable(ratio: float | None, cfg: ModelConfig, count: Callable[[int, int, int], int]) -> None:
    """A UserError if `ratio` cannot be met even with every matrix at rank 1 (the same limit for every allocator)."""
    if ratio is None:
        return
    from sigmascale_jax.errors import UserError

    shapes = list(cfg.projection_shapes().values()) * cfg.num_layers
    budget = Budget(ratio, count)
    floor = sum(budget.stored(m, n, 1) for m, n in shapes)
    if floor > budget.limit(shapes):
        most = 1 - floor / sum(m * n for m, n in shapes)
        raise UserError(f"--ratio {ratio} cannot be met even with every matrix at rank 1 (that removes {most:.4f}); "
                        f"use a smaller --ratio")


class Allocation(NamedTuple):
    ranks: Ranks
    info: dict[str, Any]  # JSON-able record of how the ranks were chosen


class RankAllocator(NamedTuple):
    """Where to cut: a rank (or dense) for every block and projection, under a budget."""

    name: str
    settings: Settings
    allocate: Callable[[ModelContext, Budget], Allocation]
    check: Callable[[RunSpec, ModelConfig], None] = lambda spec, cfg: None  # cross-checks against the run's settings and the model
    costly: bool = True  # kept in OUT.partial for a resumed run (False: recomputed, as uniform ranks are)
    # (device bytes, host bytes, note) of its whole-model passes, from the config alone (`--plan-only`)
    memory: Callable[[ModelConfig, RunSpec], tuple[int, int, str]] | None = None


class BlockInputs(NamedTuple):
    """What a factorizer sees of one block."""

    block: Params  # dense weights, `w: [out, in]`
    stats: dict  # `stats.block_stats` of the block's inputs in the pipeline's stream
    xs: np.ndarray  # [N, T, D] the block's calibration inputs
    ys: np.ndarray | None  # [N, T, D] the dense block's outputs on `xs` (None unless needed)
    cfg: ModelConfig
    batch_size: int
    ref_stats: dict | None = None  # the dense model's stream, for factorizers with `needs_dense_stream`
    mesh: Any = None  # windows split over its data axis, weights over model (None: one device)
    precision: str = "float64"  # what factorizations run in (`linalg.precision`)
    # [N, T, D] the dense block's outputs on the dense model's inputs (for refiners with a `block` step; else None)
    anchor: np.ndarray | None = None


class BlockResult(NamedTuple):
    params: Params  # the block with each projection dense `{"w"}` or factored `{"b", "c"}`
    matrices: dict[str, dict]  # per projection: shape, rank, dense, rel_loss, ... (compression.json)
    block: dict | None = None  # a per-block record (SigmaScale's held-out trace)
    spectra: dict | None = None  # arrays for spectra.npz, "<projection>.<kind>" -> [r]


class Factorizer(NamedTuple):
    """How to cut: the factors of one block's projections at given ranks."""

    name: str
    settings: Settings
    factor: Callable[[BlockInputs, dict[str, Optional[int]], Any], BlockResult]  # (inputs, ranks, PRNG key)
    needs_dense_stream: bool = False  # also feed the dense model's activations (SVD-LLM's update)
    needs_outputs: bool = False  # reads BlockInputs.ys (else it is None when --sequential: not computed)
    needs_stats: bool = True  # reads BlockInputs.stats (else, unless the encoder needs Grams, the pass is skipped)
    check: Callable[[RunSpec, ModelConfig], None] = lambda spec, cfg: None
    progress: Callable[[BlockResult], dict[str, str]] = lambda result: mean_loss(result)  # the block bar's postfix
    flat_record: bool = False  # also copy its settings to compression.json's top-level key of its name (format 1)
    # `(device bytes, note)` of factoring one block at `ranks`, from shapes alone (`--plan-only`; None: not estimated)
    memory: Callable[[ModelConfig, RunSpec, dict], tuple[int, str]] | None = None


def mean_loss(result: BlockResult) -> dict[str, str]:
    """The progress bar's default: the mean relative activation loss of the block's factored projections."""
    losses = [m["rel_loss"] for m in result.matrices.values() if not m["dense"]]
    return {"rel_loss": f"{np.mean(losses) if losses else 0.0:.4f}"}


class Encoder(NamedTuple):
    """How to store what is left: the typed leaf of each projection, and the numbers a rank-k matrix costs."""

    name: str
    settings: Settings
    count: Callable[[int, int, int], int]  # numbers stored for an m × n matrix at rank k: the budget's unit
    encode: Callable[[dict, dict], Any]  # (projection dict {"w"} or {"b","c"}, its record) -> a typed leaf
    record: Callable[[], dict] = lambda: {}  # what compression.json says of every matrix's encoding
    check: Callable[[RunSpec, ModelConfig], None] = lambda spec, cfg: None
    read: Callable[[dict, dict], Any] | None = None  # (saved dict, its compression.json record) -> the typed leaf
    reencode: Callable[[Any, str], Any] | None = None  # (a stored leaf, where it came from) -> the leaf stored this way
    # (p, record, gram, precision) -> (leaf, info for the matrix's record): an encoder that needs the Gram of the
    # projection's input (GPTQ) has this instead of `encode`; the pipeline calls it as the block loop reaches the block
    encode_gram: Callable[..., tuple[Any, dict]] | None = None

    @property
    def needs_gram(self) -> bool:
        return self.encode_gram is not None


class Refiner(NamedTuple):
    """A pass that revises factors and keeps every matrix's rank: model-level after the block loop (`refine`: ZS-SVD's
    correction, healing), or per block inside it (`block`: the refit), or both."""

    name: str
    settings: Settings
    refine: Callable[[ModelContext, list[Params], Ranks], tuple[list[Params], dict[str, Any]]] | None
    check: Callable[[RunSpec, ModelConfig], None] = lambda spec, cfg: None
    memory: Callable[[ModelConfig, RunSpec], tuple[int, str]] | None = None  # device bytes, note (`--plan-only`)
    # (inputs with `anchor`, the factored block, PRNG key, {projection: widest rank in any block}) -> the block
    # revised; runs right after the factorizer, before a Gram-reading encoder and before the block feeds the next
    block: Callable[[BlockInputs, BlockResult, Any, dict[str, int]], BlockResult] | None = None
    summary: Callable[[list[BlockResult]], dict[str, Any]] | None = None  # compression.json's record of `block`


@dataclasses.dataclass(frozen=True)
class Plan:
    """A compression's stages: how to cut (`factorize`), where (`allocate`), the refinements after the block loop and
    how to store what is left (`encode`). Built by `make_plan`; any stage may be a user's own object."""

    factorize: Factorizer
    allocate: RankAllocator
    refine: tuple[Refiner, ...] = ()
    encode: Encoder | None = None  # None: plain float32 factors (`encode/plain.py`)

    def check(self, spec: RunSpec, cfg: ModelConfig) -> None:
        """Settings that clash with each other or with the model: a UserError before anything is written."""
        allocate = (self.allocate,) if spec.ratio != 0 else ()  # --ratio 0: nothing to allocate
        for stage in (*allocate, self.factorize, *self.refine, self.encoder()):
            stage.check(spec, cfg)
        if spec.ratio == 0 and not getattr(self.encoder().settings, "kind", None):
            from sigmascale_jax.errors import UserError

            raise UserError("--ratio 0 keeps every projection dense: add --quantize int8, int4, int3 or int2 (quantization "
                            "alone), or ask for a ratio above 0")
        after_loop = [r for r in self.refine if r.refine is not None]
        if after_loop and self.encoder().needs_gram:
            from sigmascale_jax.errors import UserError

            raise UserError(f"--quantizer gptq rounds each block as the block loop reaches it, before "
                            f"{' and '.join(r.name for r in after_loop)} revises the factors; use --quantizer rtn "
                            "with it, or drop it")
        check_reachable(spec.ratio, cfg, self.encoder().count)

    def inputs(self) -> list[tuple[str, str]]:
        """`(path, role)` of the files and folders the stages' settings make the run read (`--heal-calib`,
        `--ranks-from`), which no output may replace."""
        return [x for stage in (self.allocate, self.factorize, *self.refine, self.encoder())
                for x in stage.settings.inputs()]

    def encoder(self) -> Encoder:
        if self.encode is not None:
            return self.encode
        load_methods()
        return ENCODERS["plain"].build()

    def key(self) -> dict[str, Any]:
        """The settings that change the result (part of the resume key)."""
        return {
            "allocate": {"name": self.allocate.name, **self.allocate.settings.asdict()},
            "factorize": {"name": self.factorize.name, **self.factorize.settings.asdict()},
            "refine": [{"name": r.name, **r.settings.asdict()} for r in self.refine],
            "encode": {"name": self.encoder().name, **self.encoder().settings.asdict()},
        }


# ------------------------------------------------------------------ registries


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered method: its name, settings class and constructor (`build(**settings fields)`)."""

    name: str
    settings: type[Settings]
    build: Callable[..., Any]
    help: str


ALLOCATORS: dict[str, Entry] = {}
FACTORIZERS: dict[str, Entry] = {}
REFINERS: dict[str, Entry] = {}
ENCODERS: dict[str, Entry] = {}


def register(table: dict[str, Entry], name: str, settings: type[Settings], help: str):
    """Decorator: enter a method's constructor in `table` under `name` (an encoder's also in `model.leaves`' kinds,
    so a folder's leaves read back by the encoding their record names, without `io/` knowing the encoders)."""

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in table:
            raise ValueError(f"{name!r} registered twice")
        table[name] = Entry(name, settings, build, help)
        if table is ENCODERS:
            from sigmascale_jax.model.leaves import register_leaf_kind

            def read(tree: dict, record: dict) -> Any:
                encoder = build(quantize=record.get("quantize") or "none", group_size=record.get("group_size"))
                return encoder.read(tree, record)

            register_leaf_kind(name, read)
        return build

    return deco


def load_methods() -> None:
    """Import every method module (they register themselves)."""
    from sigmascale_jax.compress import allocate, encode, factorize, refine  # noqa: F401


def make_plan(method: Any, ranks: Any = "uniform", refine: tuple = (), encoding: Any = "plain", **settings: Any) -> Plan:
    """A Plan from method names (or ready stages) and flat settings, each routed to the stage that declares it.

    `method`: a factorizer name or a `Factorizer`; `ranks`: an allocator name or a
    `RankAllocator`; `refine`: refiner names or `Refiner`s; `encoding`: an encoder name
    or an `Encoder`. A setting goes to every
    named stage whose settings have that field (`grad_samples` serves both ZS-SVD
    and its correction); one that no chosen stage takes is a UserError.
    """
    from sigmascale_jax.errors import ArgError

    load_methods()
    named = {r for r in refine if isinstance(r, str)}
    # a refiner whose settings name a switch (`heal_steps`) is on when that setting is given non-zero
    refine = tuple(refine) + tuple(e.name for e in REFINERS.values()
                                   if e.settings.switch and settings.get(e.settings.switch) and e.name not in named)
    chosen: list[tuple[str, dict[str, Entry], Any]] = [("method", FACTORIZERS, method), ("ranks", ALLOCATORS, ranks)]
    chosen += [("refine", REFINERS, r) for r in refine] + [("encoding", ENCODERS, encoding)]
    entries, built = [], {}
    for flag, table, value in chosen:
        if isinstance(value, str):
            if value not in table:
                raise ArgError(flag, f"{value!r} is unknown; known: {', '.join(table)}")
            entries.append((flag, table[value]))
        else:
            built[flag, id(value)] = value
    taken: set[str] = set()
    # a refiner switched off by its switch setting (`heal_steps=0`, e.g. over a config that heals) takes its own
    # settings with it, so a recipe's healing turns off with one flag
    for e in REFINERS.values():
        if e.settings.switch and settings.get(e.settings.switch) == 0 and e.name not in named:
            taken |= {f.name for f in dataclasses.fields(e.settings)}
    stages: dict[str, Any] = {}
    for flag, entry in entries:
        names = {f.name for f in dataclasses.fields(entry.settings)}
        kwargs = {k: v for k, v in settings.items() if k in names and v is not None}
        taken |= kwargs.keys()
        stages.setdefault(flag, []).append(entry.build(**kwargs))
    for key, value in settings.items():
        if value is None or key in taken:
            continue
        owners = [e.name for t in (FACTORIZERS, ALLOCATORS, REFINERS, ENCODERS) for e in t.values()
                  if key in {f.name for f in dataclasses.fields(e.settings)}]
        if not owners:
            raise ArgError(key, "is not a setting of any method")
        raise ArgError(key, f"is a setting of {' / '.join(owners)}, which this run does not use")
    for (flag, _), value in built.items():
        stages.setdefault(flag, []).append(value)
    return Plan(factorize=stages["method"][0], allocate=stages["ranks"][0], refine=tuple(stages.get("refine", ())),
                encode=stages["encoding"][0])
