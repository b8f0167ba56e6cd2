"""Command line and YAML configs of the compressor.

Every method's settings fields become flags (`--alpha`, `--steps`, `--grad-samples`, ...),
generated from the registries, so a new method's knobs appear here without an edit.
A YAML config gives flags by name, flat (`ratio: 0.2`, `steps: 50`) or nested per
stage (`factorize: {name: sigmascale, steps: 50}`, `allocate: {name: zs-svd}`,
`refine: [correction]`); its values are turned into command-line tokens and parsed
by the same parser, so they are converted and checked exactly like typed flags,
and flags typed on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from sigmascale_jax.compress.plan import ALLOCATORS, ENCODERS, FACTORIZERS, REFINERS, RunSpec, load_methods, make_plan
from sigmascale_jax.compress.settings import field_type, flag_name
from sigmascale_jax.errors import ArgumentParser, UserError
from sigmascale_jax.io.diskcache import COMPILE_CACHE_HELP, use_compilation_cache
from sigmascale_jax.parallel import JOIN_TIMEOUT

# Pipeline flags given by hand (their help and defaults come from RunSpec).
RUN_FLAGS = ("model", "ratio", "calib", "nsamples", "seq_len", "seed", "sequential", "batch_size", "mesh", "precision")
NESTED = {"factorize": ("method", FACTORIZERS), "allocate": ("ranks", ALLOCATORS), "encode": ("encoding", ENCODERS)}


def _add_field(group, owner_cls, field: dataclasses.Field, seen: dict[str, Any]) -> None:
    kind = field_type(owner_cls, field)
    if field.name in seen:  # a setting shared by several stages (grad_samples): one flag serves them all
        if seen[field.name] != (kind, field.default):
            raise TypeError(f"setting {field.name} declared with different types or defaults")
        return
    seen[field.name] = (kind, field.default)
    meta = field.metadata
    default = "" if field.default is None else f" (default: {field.default})"
    kwargs: dict[str, Any] = {"default": None, "help": meta.get("help", "") + default}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = kind
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
    group.add_argument(flag_name(field.name), dest=field.name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    load_methods()
    p = ArgumentParser(
        prog="python -m sigmascale_jax.compress",
        description="Compress a decoder LLM's projections with activation-aware truncated SVD: --ranks chooses where "
        "to cut, --method how, --correction refines the factors with the whole model in view.",
    )
    p.add_argument("--config", default=None, help="YAML file giving any of these flags (flags on the command line win)")
    seen: dict[str, Any] = {}
    run = p.add_argument_group("the run")
    for field in dataclasses.fields(RunSpec):
        if field.name in RUN_FLAGS:
            _add_field(run, RunSpec, field, seen)
    run.add_argument("--out", default=None, help="output folder (required)")
    run.add_argument("--data-dir", default=None, help="data folder (default: $SIGMASCALE_DATA, else ../shared/data)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and an unfinished run)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--no-compile-cache", action="store_true", help=COMPILE_CACHE_HELP)
    run.add_argument("--plan-only", action="store_true",
                     help="print each stage's device and host memory, from the model's config alone (no weights "
                     "read, nothing written; --model may be a config.json), and stop")
    run.add_argument("--device-memory", default=None, metavar="SIZE",
                     help="--plan-only: say whether each stage fits a device of this size (e.g. 80GB, 16GiB)")
    procs = p.add_argument_group("several processes (hosts): every process runs the same command with its own "
                                 "--process-id; process 0 writes --out, which every process must see")
    procs.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address, to join a multi-process run (jax.distributed); 'auto': what JAX "
                       "detects on a cluster (SLURM, Open MPI, TPU pods)")
    procs.add_argument("--num-processes", type=int, default=None, help="with --coordinator: how many processes")
    procs.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index, "
                       "0..N-1")
    procs.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT, metavar="SECONDS",
                       help="with --coordinator HOST:PORT: how long the processes wait for each other on PORT + 1 "
                       f"before an error line (default {JOIN_TIMEOUT:.0f})")
    run.add_argument("--method", default=None, choices=tuple(FACTORIZERS),
                     help="how to cut (required; at --ratio 0 it defaults to none): " + "; ".join(f"{e.name}: {e.help}" for e in FACTORIZERS.values()))
    run.add_argument("--ranks", default=None, choices=tuple(ALLOCATORS),
                     help="where to cut (default: uniform): " + "; ".join(f"{e.name}: {e.help}" for e in ALLOCATORS.values()))
    for entry in REFINERS.values():
        run.add_argument(flag_name(entry.name), default=None, action=argparse.BooleanOptionalAction, help=entry.help)
    run.add_argument("--encoding", default=None, choices=tuple(ENCODERS),
                     help="how to store what is left (default: plain): " + "; ".join(f"{e.name}: {e.help}"
                                                                           for e in ENCODERS.values()))
    for table in (FACTORIZERS, ALLOCATORS, REFINERS, ENCODERS):
        for entry in table.values():
            fields = [f for f in dataclasses.fields(entry.settings) if f.name not in seen]
            if fields:
                group = p.add_argument_group(f"{entry.name} settings")
                for field in fields:
                    _add_field(group, entry.settings, field, seen)
    return p


def _yaml_tokens(conf: dict, parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Command-line tokens that say what the YAML mapping `conf` says."""
    actions = {a.dest: a for a in parser._actions}
    tokens: list[str] = []

    def add(key: str, value: Any) -> None:
        dest = key.replace("-", "_")
        if dest == "config" or dest not in actions:
            raise UserError(f"unknown key {key!r} in {where}; keys are the flag names, e.g. ratio, nsamples")
        action, flag = actions[dest], actions[dest].option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"{key} in {where} must be true or false, got {value!r}")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
            return
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{key} in {where} must be a single value, got {value!r}")
        tokens.extend([flag, str(value)])

    for key, value in conf.items():
        if key in NESTED:
            flag, table = NESTED[key]
            if not isinstance(value, dict) or "name" not in value:
                raise UserError(f"{key} in {where} must be a mapping with a name, e.g. {{name: {next(iter(table))}}}")
            add(flag, value["name"])
            for k, v in value.items():
                if k != "name":
                    add(k, v)
        elif key == "refine":
            for item in value if isinstance(value, list) else [value]:
                item = {"name": item} if isinstance(item, str) else item
                if not isinstance(item, dict) or item.get("name") not in REFINERS:
                    raise UserError(f"refine in {where} lists refinements by name; known: {', '.join(REFINERS)}")
                add(item["name"], True)
                for k, v in item.items():
                    if k != "name":
                        add(k, v)
        else:
            add(str(key), value)
    return tokens


def _read_config(path: str) -> dict:
    import yaml

    try:
        conf = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read --config {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(conf, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values")
    return conf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        tokens = _yaml_tokens(_read_config(args.config), parser, args.config)
        checker = build_parser()

        def yaml_error(message: str):
            raise UserError(f"{args.config}: {message}")

        checker.error = yaml_error  # type: ignore[method-assign]
        checker.parse_args(tokens)  # a bad YAML value is reported against the file
        args = parser.parse_args(tokens + list(sys.argv[1:] if argv is None else argv))
    if args.method is None and args.ratio == 0:
        args.method = "none"  # --ratio 0: quantization alone, nothing to cut
    for name in ("model", "method", "ratio") + (() if args.plan_only else ("out",)):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required (on the command line or in --config)")
    return args


def spec_and_plan(args: argparse.Namespace):
    """The RunSpec and Plan a parsed command line asks for (settings checked by their dataclasses)."""
    spec = RunSpec(**{k: getattr(args, k) for k in RUN_FLAGS if getattr(args, k) is not None})
    refine = tuple(name for name in REFINERS if getattr(args, name.replace("-", "_")))
    skip = set(RUN_FLAGS) | {"config", "out", "data_dir", "overwrite", "no_progress", "no_compile_cache", "method",
                             "ranks", "encoding", "plan_only", "device_memory", "coordinator", "num_processes", "process_id",
                             "join_timeout"}
    settings = {k: v for k, v in vars(args).items() if k not in skip | set(REFINERS) and v is not None}
    return spec, make_plan(args.method, args.ranks or "uniform", refine, args.encoding or "plain", **settings)


def main(argv: list[str] | None = None) -> int:
    from sigmascale_jax.compress.pipeline import run

    args = parse_args(argv)
    spec, plan = spec_and_plan(args)
    if args.plan_only:
        return plan_only(spec, plan, args.device_memory)
    from sigmascale_jax.parallel import initialize, is_main_process

    initialize(args.coordinator, args.num_processes, args.process_id, args.join_timeout)
    if not is_main_process():  # its checkpoints go to a scratch folder: Orbax's notes on them mean nothing to a user
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
    use_compilation_cache(not args.no_compile_cache)
    from sigmascale_jax.io.outputs import Input

    config = [Input(args.config, "the config file", whole=False)] if args.config else []
    report = run(spec, plan, args.out, data_dir=args.data_dir, overwrite=args.overwrite,
                 progress=not args.no_progress and is_main_process(), inputs=config)
    if not is_main_process():
        return 0
    extra = (" +update" if report["update"] else "") + (f", ranks {report['ranks_method']}")
    extra += "".join(f", {r['name']}" + (" (dropped by its guard)" if r.get("kept") == "uncorrected" else "")
                     for r in report["refine"])
    enc = report["encode"]
    if enc.get("group_size"):  # set iff quantized; "quantizer" kept only where it is not rtn
        extra += f", {enc['name']} {enc['quantize']}" + (f" {enc['quantizer']}" if enc.get("quantizer") else "")
    else:
        extra += f", {enc['name']}"
    print(f"{report['method']}{extra}: ratio asked {report['ratio_requested']:.3f}, "
          f"achieved {report['ratio_achieved']:.4f} (whole model {report['whole_model_ratio']:.4f}; in bytes "
          f"{report['byte_ratio']:.4f}, whole model {report['whole_model_byte_ratio']:.4f}) "
          f"in {report['seconds']:.1f} s, host peak {report['memory']['host_peak_mib']:.0f} MiB")
    print(f"wrote {args.out}; evaluate with: python -m sigmascale_jax.eval --model {args.out}")
    return 0


def plan_only(spec, plan, device_memory: str | None) -> int:
    """`--plan-only`: the memory plan of this run from the model's config, printed; no weights read."""
    from sigmascale_jax.compress.memory import memory_plan, parse_bytes, plan_table
    from sigmascale_jax.io.sources import read_config

    limit = parse_bytes(device_memory) if device_memory else None
    cfg = read_config(spec.model)
    plan.check(spec, cfg)
    print(f"memory plan: {spec.model} ({cfg.num_layers} blocks, hidden {cfg.hidden_size}), {plan.factorize.name} at "
          f"ratio {spec.ratio}, {spec.nsamples} x {spec.seq_len} calibration windows, batch {spec.batch_size}")
    print(plan_table(memory_plan(cfg, spec, plan), limit))
    return 0

