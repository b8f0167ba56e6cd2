"""Resolve a `--model SRC` to a config, a tensor reader and a tokenizer.

SRC may be a Hugging Face folder, a `.gguf` file (or a folder holding exactly one),
a hub id (through `huggingface_hub`, which honours its cache and `HF_HUB_OFFLINE`),
or a folder written by this project's compressor (`compression.json` + Orbax params).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.checkpoint import REPORT_FILE as COMPRESSED_MARKER
from sigmascale_jax.io.checkpoint import read_report
from sigmascale_jax.io.fileio import read_json
from sigmascale_jax.io.readers import GGUFReader, SafetensorsReader, TensorReader
from sigmascale_jax.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclasses.dataclass
class ModelSource:
    """A resolved model: its config, a reader of its tensors and where its tokenizer lives."""

    src: str
    kind: str  # "hf", "gguf" or "compressed"
    cfg: ModelConfig
    reader: TensorReader | None  # None for compressed folders: their params come whole from Orbax
    folder: Path
    gguf_file: str | None = None
    _tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)

    def load_params(self, dtype: Any = None, progress: bool = False) -> dict:
        """The whole params pytree (dense for checkpoints, factored for compressed folders)."""
        import jax.numpy as jnp

        from sigmascale_jax.io.hf_map import load_params

        if self.kind == "compressed":
            from sigmascale_jax.io.checkpoint import load_compressed

            return load_compressed(self.folder, dtype)[1]
        return load_params(self.reader, self.cfg, dtype or jnp.float32, progress=progress)

    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded once; a GGUF's takes seconds to convert)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def save_tokenizer(self, folder: Path) -> None:
        """Write the tokenizer's files into `folder`; a GGUF's cached conversion is copied without loading it."""
        import shutil

        if self._tokenizer is None and self.gguf_file:
            entry = _gguf_cache_entry(self.folder / self.gguf_file)
            if entry is not None and (entry / "tokenizer" / "tokenizer_config.json").is_file():
                shutil.copytree(entry / "tokenizer", folder, dirs_exist_ok=True)  # a resumed run may have one
                return
        self.tokenizer().save_pretrained(str(folder))

    def _tokenizer_folder(self) -> Path:
        """A compressed folder's `tokenizer/` (a missing one would send transformers to the hub with a path as id)."""
        from sigmascale_jax.io.checkpoint import TOKENIZER_DIR

        folder = self.folder / TOKENIZER_DIR
        if not (folder / "tokenizer_config.json").is_file():
            raise UserError(f"{folder} is missing or holds no tokenizer_config.json: the compressed folder is "
                            "incomplete; copy the source model's tokenizer there (save_pretrained) or recompress")
        return folder

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self.gguf_file:
                    tok = _gguf_tokenizer(self.folder / self.gguf_file)
                elif self.kind == "compressed":
                    tok = AutoTokenizer.from_pretrained(str(self._tokenizer_folder()))
                else:
                    tok = AutoTokenizer.from_pretrained(str(self.folder))
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"cannot load a tokenizer from {self.src}: {' '.join(str(e).split())[:300]}") from None
        # Evaluation tokenizes whole corpora at once; the model-length warning is noise there.
        tok.model_max_length = int(1e12)
        return tok


def _gguf_cache_entry(path: Path) -> Path | None:
    """The disk-cache folder for what is converted from a GGUF file's metadata (None: cache off).

    Keyed by the sha1 of the file's first 16 MiB (its header: architecture, tokenizer,
    tensor table) and its size, so the key costs milliseconds even for a large model,
    and by the transformers version that converts.
    """
    import hashlib
    from importlib.metadata import version

    from sigmascale_jax.io.diskcache import cache_dir

    root = cache_dir()
    if root is None:
        return None
    h = hashlib.sha1()
    with path.open("rb") as f:
        h.update(f.read(16 << 20))
    h.update(str(path.stat().st_size).encode())
    return root / "gguf" / f"{h.hexdigest()}-transformers{version('transformers')}"


def _save_entry(entry: Path, write) -> None:
    """Fill a cache entry atomically (`write(folder)`); an unwritable cache costs only the reuse."""
    try:
        staging = entry.with_name(entry.name + f".{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        write(staging)
        staging.rename(entry)
    except OSError:
        pass


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer a GGUF file carries: converted once (seconds), then loaded from the disk cache."""
    from transformers import AutoTokenizer

    entry = _gguf_cache_entry(path)
    if entry is not None and (entry / "tokenizer" / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry / "tokenizer"))
        except Exception:  # a damaged entry is converted again
            pass
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if entry is not None:
        import shutil

        def write(folder: Path) -> None:
            if entry.exists():  # the config is already there: add the tokenizer beside it
                shutil.copytree(entry, folder, dirs_exist_ok=True)
                shutil.rmtree(entry)
            tok.save_pretrained(str(folder / "tokenizer"))

        _save_entry(entry, write)
    return tok


def unfinished_run(path: Path) -> bool:
    """Whether `path` is the compressor's staging folder (`OUT.partial`: an interrupted run)."""
    return path.name.endswith(".partial") and (path / "spec.json").is_file()


def detect_kind(path: Path) -> str:
    """'gguf', 'hf' or 'compressed' for a local path; UserError if it is none of them."""
    if unfinished_run(path):
        raise UserError(f"{path} is an unfinished compression run, not a model: rerun the compressor command that "
                        f"started it to finish it (it resumes), then use {path.with_name(path.name[: -len('.partial')])}")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise UserError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder")
    if (path / COMPRESSED_MARKER).is_file():
        return "compressed"
    if (path / "config.json").is_file():
        return "hf"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    raise UserError(
        f"{path} has no config.json (nor a single .gguf file); a Hugging Face model folder needs "
        "config.json and model.safetensors"
    )


def resolve(src: str) -> Path:
    """A local path for SRC: itself if it exists, else a hub snapshot."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    if unfinished_run(partial):
        raise UserError(f"{src} does not exist yet: {partial} holds its unfinished compression; rerun the compressor "
                        "command that started it to finish it (it resumes)")
    if not _HUB_ID.match(src) or src.startswith((".", "/", "~")):
        raise UserError(f"model path {src} does not exist; pass a model folder, a .gguf file or a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                src,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            )
        )
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if offline else ""
        raise UserError(f"cannot fetch {src} from the Hugging Face hub{hint}: {' '.join(str(e).split())[:200]}") from None


def _hf_config(folder: Path) -> ModelConfig:
    raw = read_json(folder / "config.json")
    if not isinstance(raw, dict):
        raise UserError(f"{folder / 'config.json'} must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {model_type!r} in {folder / 'config.json'}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # transformers' own errors for fields it cannot use
        raise UserError(f"cannot read {folder / 'config.json'}: {' '.join(str(e).split())[:200]}") from None
    return config_from_hf(hf)


def _gguf_config(path: Path) -> ModelConfig:
    """The model config from a GGUF file's metadata: converted once by transformers, then read from the disk cache."""
    entry = _gguf_cache_entry(path)
    if entry is not None and (entry / "model_config.json").is_file():
        try:
            return ModelConfig.from_dict(read_json(entry / "model_config.json"))
        except (UserError, TypeError, KeyError):
            pass
    cfg = _gguf_config_uncached(path)
    if entry is not None:
        import shutil

        def write(folder: Path) -> None:
            if entry.exists():
                shutil.copytree(entry, folder, dirs_exist_ok=True)
                shutil.rmtree(entry)
            (folder / "model_config.json").write_text(json.dumps(cfg.to_dict()))

        _save_entry(entry, write)
    return cfg


def _gguf_config_uncached(path: Path) -> ModelConfig:
    from sigmascale_jax.io.readers import lean_gguf_reader

    try:
        arch = str(lean_gguf_reader(path).fields["general.architecture"].contents())
    except Exception as e:
        raise UserError(f"cannot read GGUF file {path}: {' '.join(str(e).split())[:200]}") from None
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {arch!r} in {path}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_from_hf(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))


def read_config(src: str) -> ModelConfig:
    """The `ModelConfig` of SRC without touching its tensors: what `open_model` reads, and also a bare
    `config.json` (or a folder holding only one), as `--plan-only` takes for models not on this machine."""
    path = Path(src).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return _hf_config(path.parent) if path.name == "config.json" else _hf_config_file(path)
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        return _hf_config(path)
    return open_model(src).cfg


def _hf_config_file(file: Path) -> ModelConfig:
    """A config saved under another name (`llama-70b.json`): read through a folder of its own."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(file, Path(tmp) / "config.json")
        return _hf_config(Path(tmp))


def open_model(src: str) -> ModelSource:
    """Resolve SRC and read its config; tensors stay on disk until asked for."""
    path = resolve(src)
    kind = detect_kind(path)
    if kind == "compressed":
        cfg = ModelConfig.from_dict(read_report(path)["model_config"])
        return ModelSource(src, "compressed", cfg, None, path)
    if kind == "gguf":
        file = path if path.is_file() else next(path.glob("*.gguf"))
        cfg = _gguf_config(file)
        reader = GGUFReader(file, cfg.num_heads, cfg.num_kv_heads)
        return ModelSource(src, "gguf", cfg, reader, file.parent, gguf_file=file.name)
    cfg = _hf_config(path)
    return ModelSource(src, "hf", cfg, SafetensorsReader(path), path)


def load_model(src: str, dtype: Any = None, progress: bool = False) -> tuple[ModelConfig, dict, ModelSource]:
    """`(cfg, params, source)` of SRC: a Hugging Face folder, a `.gguf` file (or a folder holding one), a hub id, or
    a folder the compressor (or `save_compressed`) wrote.

    `params`: `{"embed": [V, D], "blocks": [...], "final_norm": [D], "lm_head": [V, D]}` (`model/modeling.py`), each
    projection `{"w": [out, in]}` for a checkpoint or its typed leaf for a compressed folder; `dtype` casts the float
    arrays (default float32). `source` gives the tokenizer (`source.tokenizer()`) and the calibration windows.
    """
    source = open_model(src)
    return source.cfg, source.load_params(dtype, progress=progress), source
