"""Tensor readers: one tensor at a time, by Hugging Face name, from safetensors or GGUF files.

A reader never holds the whole checkpoint: safetensors are memory-mapped and
GGUF tensors are dequantized one by one when asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import read_json


class TensorReader(Protocol):
    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...  # from the file's metadata, without reading the data

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsReader:
    """Reads a folder's `model.safetensors`, or shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            raw = read_json(index)
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors file in {folder}; expected model.safetensors or shards with an index")
            weight_map = None
        self._handles = {}
        for f in files:
            path = folder / f
            if not path.is_file():
                raise UserError(f"shard {f} listed in {index} is missing from {folder}")
            try:
                self._handles[f] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise UserError(f"cannot read {path}: {_one_line(e)} (truncated or not a safetensors file?)") from None
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._handles[self._where[name]].get_slice(name).get_shape())
        except KeyError:
            raise UserError(f"tensor {name!r} missing from the checkpoint in {self.folder}") from None

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise UserError(f"tensor {name!r} missing from the checkpoint in {self.folder}") from None
        except Exception as e:
            raise UserError(f"cannot read tensor {name!r} from {self.folder}: {_one_line(e)}") from None


# llama.cpp tensor name -> Hugging Face name.
_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
]


def hf_name_of_gguf(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for tensors we do not use (rope_freqs)."""
    for pat, repl in _GGUF_TO_HF:
        if re.fullmatch(pat, name):
            return re.sub(pat, repl, name)
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of a Q or K weight (or bias).

    llama.cpp's converter maps HF rows with `reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`;
    this is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lean_gguf_reader(path: Path):
    """`gguf.GGUFReader` of `path` whose array fields (the tokenizer's tokens, types and merges) are skipped.

    gguf builds one numpy view per array element (~250k for a 49k-token vocabulary:
    seconds at every open, most of a compression's set-up). The tensors and scalar
    metadata are all this reader needs (tokenizer and config are converted once and
    cached, see sources), so array fields keep their type and length and no contents.
    """
    import struct

    import gguf

    class Lean(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY and self.byte_order != "S":
                raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
                itype, n, offs = gguf.GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
                if itype == gguf.GGUFValueType.STRING:
                    buf = memoryview(self.data)
                    for _ in range(n):  # each string: uint64 length, then its bytes
                        offs += 8 + struct.unpack_from("<Q", buf, offs)[0]
                elif itype in self.gguf_scalar_to_np:
                    offs += n * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
                else:  # nested arrays: gguf's own walk
                    return super()._get_field_parts(orig_offs, raw_type)
                return offs - orig_offs, [raw_itype, alen], [], [gguf.GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

    return Lean(str(path))


class GGUFReader:
    """Reads a llama.cpp GGUF file, dequantizing each tensor to float32 on request."""

    # Architectures whose Q/K rows llama.cpp permutes on conversion.
    PERMUTED_ARCHS = ("llama", "mistral")

    def __init__(self, path: Path, n_head: int, n_kv_head: int):
        self.path = path
        try:
            self._reader = lean_gguf_reader(path)
        except Exception as e:
            raise UserError(f"cannot read GGUF file {path}: {_one_line(e)}") from None
        self.arch = str(self._reader.fields["general.architecture"].contents())
        self._tensors = {}
        for t in self._reader.tensors:
            hf = hf_name_of_gguf(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self._n_head, self._n_kv_head = n_head, n_kv_head

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(int(d) for d in reversed(self._tensors[name].shape))  # ggml lists dims innermost first
        except KeyError:
            raise UserError(f"tensor {name!r} missing from {self.path}") from None

    def get(self, name: str) -> np.ndarray:
        import gguf

        try:
            t = self._tensors[name]
        except KeyError:
            raise UserError(f"tensor {name!r} missing from {self.path}") from None
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # ggml lists dims innermost first; numpy wants [out, in].
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if self.arch in self.PERMUTED_ARCHS:
            if re.search(r"self_attn\.q_proj\.", name):
                w = unpermute_qk(w, self._n_head)
            elif re.search(r"self_attn\.k_proj\.", name):
                w = unpermute_qk(w, self._n_kv_head)
        return w


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

