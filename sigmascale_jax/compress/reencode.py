"""Store a finished compression another way: same ranks and factors, another encoding (PivGa, int8, int4).

Encoding is the pipeline's last stage and needs nothing but the factors, so a compressed
folder can be re-encoded without calibration data or a second factorization:

    from sigmascale_jax.compress.reencode import reencode
    report = reencode("runs/smollm2-pivga-0.2", "runs/smollm2-pivga-int4-0.2", quantize="int4")

Quantized matrices cannot be re-encoded (their float values are gone); a PivGa folder
can be quantized; a plain one can become PivGa (lossless: the same matrices in fewer
numbers, so the ranks stay and the ratio grows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sigmascale_jax.errors import UserError
from sigmascale_jax.model.modeling import PROJECTIONS


def reencode(src: str | Path, out: str | Path, *, encoding: str | None = None, quantize: str = "none",
             group_size: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write `src`'s model to `out` with its projections stored as `encoding` (default: as in `src`), quantized
    as `quantize`; returns the new report (compression.json, with `reencoded_from`)."""
    from sigmascale_jax.compress.pipeline import stored_params
    from sigmascale_jax.compress.plan import ENCODERS, load_methods
    from sigmascale_jax.compress.report import matrix_bytes
    from sigmascale_jax.io.checkpoint import load_compressed, read_report, report_store_dtype, write_derived
    from sigmascale_jax.io.outputs import check_out, model_input, writing_folder

    src, out = Path(src), Path(out)
    report = read_report(src)
    encoding = encoding or report.get("encoding", "plain")
    load_methods()
    if encoding not in ENCODERS:
        raise UserError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODERS)}")
    enc = ENCODERS[encoding].build(quantize=quantize, group_size=group_size)
    inputs = model_input(src, "the model being re-encoded")
    check_out(out, overwrite, inputs)
    cfg, params = load_compressed(src)
    enc.check(None, cfg)
    records = {(m["block"], m["name"]): m for m in report["matrices"]}
    store_dtype = report_store_dtype(report)  # the source's float tensors stay as stored
    blocks, matrices = [], []
    for i, block in enumerate(params["blocks"]):
        new = dict(block)
        for n in PROJECTIONS:
            new_leaf = enc.reencode(block[n], str(src))
            new[n] = new_leaf
            rec = records[(i, n)]
            k = rec["rank"] if not rec.get("dense") else None
            stored = rec["shape"][0] * rec["shape"][1] if k is None else min(rec["shape"][0] * rec["shape"][1],
                                                                              enc.count(*rec["shape"], k))
            matrices.append({**rec, **enc.record(), "stored": stored,
                             "bytes": matrix_bytes(new_leaf, store_dtype)})
        blocks.append(new)
    dense = report["params"]["compressible_dense"]
    other = report["params"]["model_dense"] - dense
    stored = sum(m["stored"] for m in matrices)
    nbytes = sum(m["bytes"] for m in matrices)
    other_bytes = report["bytes"].get("other", 4 * other)
    new_report = {
        **report, "encoding": encoding, "encode": {"name": encoding, **enc.settings.asdict()}, "matrices": matrices,
        "reencoded_from": str(src),
        "ratio_achieved": 1.0 - stored / dense,
        "whole_model_ratio": 1.0 - (other + stored) / report["params"]["model_dense"],
        "byte_ratio": 1.0 - nbytes / (4 * dense),
        "whole_model_byte_ratio": 1.0 - (other_bytes + nbytes) / (4 * report["params"]["model_dense"]),
        "params": {**report["params"], "compressible_compressed": stored, "model_compressed": other + stored},
        "bytes": {"compressible_dense": 4 * dense, "compressible_compressed": nbytes,
                  "model_dense": 4 * report["params"]["model_dense"], "model_compressed": other_bytes + nbytes,
                  "other": other_bytes},
    }
    with writing_folder(out, overwrite, inputs) as staging:
        write_derived(staging, stored_params({**params, "blocks": blocks}, store_dtype), new_report, src)
    return new_report
