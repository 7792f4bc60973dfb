"""Save and load model and optimizer state: atomic writes, plain formats, no code run on load.

The suffix of the path picks the format:

* ``.safetensors``: the safetensors layout, written and read here with NumPy (no
  dependency): an 8-byte little-endian header length, a JSON header mapping each
  tensor name to ``{"dtype", "shape", "data_offsets"}`` plus a ``"__metadata__"``
  map of strings, padded with spaces to a multiple of 8, then the raw
  little-endian bytes. Files load in the ``safetensors`` library and back. bfloat16
  (ml_dtypes' on the host) is stored as ``BF16``; reading one needs ml_dtypes.
* ``.npz``: ``np.savez`` arrays, the metadata as UTF-8 JSON in a uint8 array
  ``"__metadata__"``; read with ``np.load(path, allow_pickle=False)``. NumPy's format has no
  bfloat16 (it reads one back as raw bytes), so a bfloat16 array is refused here.

Arrays go under ``model.<name>`` (``Module.state_dict()``) and ``optimizer.<path>``
(the array leaves of ``optimizer.state_dict()``, e.g.
``optimizer.state.0.momentum_buffer``). Everything else (epoch, step, extra, the
optimizer's hyperparameters and scalars, ``model.extra_states()``,
``format_version``, deepcore's version) is one JSON document. Arrays are stored
from the host as NumPy arrays, so a checkpoint written from CuPy or PyTorch
loads on NumPy; ``Module.load_state_dict`` converts to the model's backend and dtype.

A file without deepcore metadata (e.g. ``safetensors.numpy.save_file(weights)``)
loads as weights only: every tensor is model state, with a ``"model."`` prefix
removed when every name has it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import __version__
from ._io import atomic_write
from .backend import get_backend
from .nn.module import Module

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: The layout written here; readers accept 1..FORMAT_VERSION.
FORMAT_VERSION = 1
_FORMAT = "deepcore.checkpoint"
SUFFIXES = (".safetensors", ".npz")
_NPZ_META = "__metadata__"
_ST_META_KEY = "deepcore"  # key in safetensors' "__metadata__" map holding our JSON
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header size

# safetensors dtype codes <-> NumPy (kind + itemsize); BF16 is ml_dtypes' bfloat16 (by name: its
# kind is "V"), FP8 has no NumPy dtype.
_CODES = {"F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "I32": "i4", "I16": "i2", "I8": "i1",
          "U64": "u8", "U32": "u4", "U16": "u2", "U8": "u1", "BOOL": "b1"}
_CODE_OF = {v: k for k, v in _CODES.items()}
_BF16 = "BF16"
_READABLE = ", ".join(sorted([*_CODES, _BF16]))


def _code_of(dtype: np.dtype) -> str | None:
    """The safetensors code of ``dtype``, None for one checkpoints do not store."""
    if dtype.name == "bfloat16":
        return _BF16
    return _CODE_OF.get(dtype.kind + str(dtype.itemsize))


def _bfloat16(path: Path, name: str) -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise _bad(path, f"tensor {name!r} is BF16, which NumPy reads only with ml_dtypes installed: "
                         f"pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


class CheckpointError(ValueError):
    """A file that is not a readable deepcore checkpoint (the message names the file)."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds, with every array as a NumPy array on the host."""

    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, Any] | None = None
    epoch: int | None = None
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_extra_states: dict[str, Any] = field(default_factory=dict)
    #: None for a plain weights file without deepcore metadata.
    format_version: int | None = FORMAT_VERSION
    deepcore_version: str | None = None

    def restore(self, model: Module, optimizer: Any = None) -> None:
        """Give ``model`` (and ``optimizer``) this checkpoint's state, as ``load_checkpoint(path, model,
        optimizer)`` does, without reading the file again: all of it, or on any error none of it."""
        if not isinstance(model, Module):
            raise TypeError(f"Checkpoint.restore: model must be a deepcore Module, got {type(model).__name__}")
        if optimizer is not None and self.optimizer_state is None:
            raise CheckpointError("Checkpoint.restore: this checkpoint holds no optimizer state to restore")
        _restore(self, model, optimizer)


# ====================================================================== save
def save_checkpoint(path: str | os.PathLike[str], model: Module, optimizer: Any = None, *,
                    epoch: int | None = None, step: int | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (parameters, buffers, extra states) and ``optimizer`` state to ``path`` atomically.

    The format follows the suffix (``.safetensors`` or ``.npz``). The file appears
    complete or not at all: on any error an existing file at ``path`` is untouched.
    ``extra`` is any JSON-able dict. Returns the path written.
    """
    path = Path(path)
    fmt = _format_of(path, "save_checkpoint")
    if not isinstance(model, Module):
        raise TypeError(f"save_checkpoint: model must be a deepcore Module, got {type(model).__name__}")
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "deepcore_version": __version__,
        "epoch": _optional_int(epoch, "epoch"),
        "step": _optional_int(step, "step"),
        "extra": json_dict({} if extra is None else extra, "extra"),
        "model_extra_states": json_dict(model.extra_states(), "model.extra_states()"),
        "optimizer": None,
    }
    arrays: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        arrays[f"model.{name}"] = _host_array(value, f"model state {name!r}")
    if optimizer is not None:
        state = optimizer.state_dict()
        if not isinstance(state, dict):
            raise TypeError(f"save_checkpoint: optimizer.state_dict() must return a dict, got {type(state).__name__}")
        meta["optimizer"] = _encode(state, (), arrays)
    if fmt == ".npz":
        half = next((name for name, a in arrays.items() if a.dtype.name == "bfloat16"), None)
        if half is not None:
            raise TypeError(f"save_checkpoint: {half!r} is bfloat16, which .npz cannot hold (NumPy's format has "
                            f"no bfloat16 and reads it back as raw bytes); save to a .safetensors path, which "
                            f"stores it as BF16")
    meta_json = json.dumps(meta)  # every part was checked above; the arrays were swapped for names
    # Everything that can fail on bad input has failed by now: only I/O is left.
    if fmt == ".safetensors":
        atomic_write(path, lambda f: _write_safetensors(f, arrays, meta_json))
    else:
        atomic_write(path, lambda f: _write_npz(f, arrays, meta_json))
    return path


def _format_of(path: Path, fn: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{fn}: {str(path)!r} must end in {' or '.join(SUFFIXES)} (the suffix picks the format), "
                         f"got suffix {path.suffix!r}")
    return suffix


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"save_checkpoint: {name} must be an int or None, got {value!r}")
    return int(value)


def json_dict(value: Any, what: str, fn: str = "save_checkpoint") -> dict[str, Any]:
    """``value`` itself when it is a dict that JSON can hold, else a TypeError naming ``fn`` and ``what``."""
    if not isinstance(value, dict):
        raise TypeError(f"{fn}: {what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{fn}: {what} must be JSON-serialisable: {exc}") from None
    return value


def _host_array(value: Any, what: str) -> np.ndarray:
    # np.require, not np.ascontiguousarray, which turns 0-d arrays (a step counter) into 1-d ones.
    a = np.require(get_backend(value).to_numpy(value), requirements="C")
    if _code_of(a.dtype) is None:
        raise TypeError(f"save_checkpoint: {what} has dtype {a.dtype}, which checkpoints do not store "
                        f"(supported: {_READABLE})")
    return a


def _encode(obj: Any, path: tuple[str, ...], arrays: dict[str, np.ndarray]) -> Any:
    """A JSON-able copy of the optimizer state: arrays move to ``arrays`` and leave ``{"__array__": name}``;
    tuples become ``{"__tuple__": [...]}`` so that they come back as tuples."""
    where = ".".join(path) or "the top level"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):  # a NumPy scalar hyperparameter: a plain JSON number
        return obj.item()
    if isinstance(obj, dict):
        if set(obj) in ({"__array__"}, {"__tuple__"}):
            raise ValueError(f"save_checkpoint: optimizer state at {where} uses the reserved key {next(iter(obj))!r}")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"save_checkpoint: optimizer state keys must be strings (the state_dict contract "
                                f"uses '0', '1', ...), got {k!r} at {where}")
            out[k] = _encode(v, (*path, k), arrays)
        return out
    if isinstance(obj, list):
        return [_encode(v, (*path, str(i)), arrays) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, (*path, str(i)), arrays) for i, v in enumerate(obj)]}
    try:
        get_backend(obj)
    except TypeError:
        raise TypeError(f"save_checkpoint: optimizer state at {where} is {type(obj).__name__}, "
                        f"neither JSON-able nor an array") from None
    name = "optimizer." + ".".join(path)
    if name in arrays:  # keys containing dots could otherwise overwrite each other
        raise ValueError(f"save_checkpoint: two optimizer arrays map to the same name {name!r}")
    arrays[name] = _host_array(obj, f"optimizer state {'.'.join(path)!r}")
    return {"__array__": name}


def _write_safetensors(f: IO[bytes], arrays: dict[str, np.ndarray], meta_json: str) -> None:
    # Widest dtypes first (stable, so state order is kept within a width), as the safetensors
    # library does: with the data starting at a multiple of 8, every tensor is then aligned.
    order = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {_ST_META_KEY: meta_json}}
    offset = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _code_of(a.dtype), "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in order:
        _write_array(f, arrays[name])


def _write_array(f: IO[bytes], a: np.ndarray) -> None:
    """The raw little-endian bytes of ``a`` (C order)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    f.write(a.reshape(-1).view(np.uint8))


def _write_npz(f: IO[bytes], arrays: dict[str, np.ndarray], meta_json: str) -> None:
    np.savez(f, **arrays, **{_NPZ_META: np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)})


# ====================================================================== load
def load_checkpoint(path: str | os.PathLike[str], model: Module | None = None, optimizer: Any = None) -> Checkpoint:
    """Read a checkpoint; with ``model`` / ``optimizer`` given, also restore their state.

    The model takes the parameters and buffers (converted to its current backend and
    dtype) and the extra states; the optimizer gets ``load_state_dict`` with NumPy arrays.
    If any part of the restore fails, the model is put back as it was and the error raised.
    Raises :class:`CheckpointError` for a file that is not a valid checkpoint.
    """
    path = Path(path)
    fmt = _format_of(path, "load_checkpoint")
    tensors, meta_json = _read_safetensors(path) if fmt == ".safetensors" else _read_npz(path)
    checkpoint = _assemble(path, tensors, meta_json)
    if optimizer is not None and checkpoint.optimizer_state is None:
        raise CheckpointError(f"load_checkpoint: {str(path)!r} holds no optimizer state to restore")
    if model is not None:
        if not isinstance(model, Module):
            raise TypeError(f"load_checkpoint: model must be a deepcore Module, got {type(model).__name__}")
        _restore(checkpoint, model, optimizer)
    elif optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer_state)
    return checkpoint


def _restore(checkpoint: Checkpoint, model: Module, optimizer: Any) -> None:
    # load_state_dict checks before it assigns, but the later steps may still fail (extra states of
    # another architecture, an optimizer refusing its state): keep the very arrays to put back.
    saved = model.snapshot()
    try:
        model.load_state_dict(checkpoint.model_state)
        if checkpoint.model_extra_states:
            model.load_extra_states(checkpoint.model_extra_states)
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
    except BaseException:
        model.restore(saved)
        raise


def _bad(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r}: {message}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _bad(path, f"not a checkpoint: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _bad(path, f"header length {n} is beyond the file size of {size} bytes "
                             f"(truncated, or not a safetensors file)")
        if n > _MAX_HEADER:
            raise _bad(path, f"header length {n} exceeds the limit of {_MAX_HEADER} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _bad(path, f"not a checkpoint: the safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _bad(path, "not a checkpoint: the safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _bad(path, "__metadata__ must map strings to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries = {name: _entry(path, name, info, data_len) for name, info in header.items()}
        _check_layout(path, entries, data_len)
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            buf = bytearray(end - begin)  # a writable array without a second copy
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise _bad(path, f"tensor {name!r} is cut short (the file changed while being read?)")
            tensors[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return tensors, metadata.get(_ST_META_KEY)


def _entry(path: Path, name: str, info: Any, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked against the file."""
    if not isinstance(info, dict):
        raise _bad(path, f"tensor {name!r}: header entry must be an object, got {info!r}")
    code = info.get("dtype")
    if code not in _CODES and code != _BF16:
        raise _bad(path, f"tensor {name!r} has unknown dtype {code!r}; readable: {_READABLE}")
    shape = info.get("shape")
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
        raise _bad(path, f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _bad(path, f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the data section of "
                         f"{data_len} bytes (truncated?)")
    dtype = _bfloat16(path, name) if code == _BF16 else np.dtype(_CODES[code]).newbyteorder("<")
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {code} needs {need} bytes but data_offsets "
                         f"span {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_layout(path: Path, entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]], data_len: int) -> None:
    """The safetensors library's rule: in order of their offsets, the tensors tile the data section
    exactly, each starting where the one before ends, from byte 0 to the end of the file; so no
    overlap, no gap and no trailing bytes (the order of the names in the header is free)."""
    at, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != at:
            where = f"tensor {previous!r} ends at byte {at}" if previous is not None else "the data starts at byte 0"
            what = "overlaps the tensor before it" if begin < at else "leaves a gap"
            raise _bad(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {what} ({where})")
        at, previous = end, name
    if at != data_len:
        raise _bad(path, f"the tensors cover {at} of the {data_len} bytes of the data section "
                         f"({data_len - at} bytes belong to no tensor)")


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no file {str(path)!r}")
    try:
        # allow_pickle=False: an object array in the file is refused instead of unpickled.
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _bad(path, f"not a checkpoint (not a readable .npz archive): {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _bad(path, "not a checkpoint: a single .npy array, not an .npz archive")
    try:
        with archive:
            tensors = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise _bad(path, f"corrupt .npz archive: {exc}") from None
    meta = tensors.pop(_NPZ_META, None)
    if meta is None:
        return tensors, None
    if meta.dtype != np.uint8 or meta.ndim != 1:
        raise _bad(path, f"{_NPZ_META} must be a 1-D uint8 array of JSON, got {meta.dtype} of shape {meta.shape}")
    try:
        return tensors, meta.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"{_NPZ_META} is not UTF-8 text ({exc})") from None


def _assemble(path: Path, tensors: dict[str, np.ndarray], meta_json: str | None) -> Checkpoint:
    if meta_json is None:
        strip = bool(tensors) and all(name.startswith("model.") for name in tensors)
        return Checkpoint({name[6:] if strip else name: a for name, a in tensors.items()}, format_version=None)
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:
        raise _bad(path, f"the checkpoint metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _bad(path, f"not a deepcore checkpoint: the metadata does not say format {_FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _bad(path, f"unsupported format_version {version!r}; this deepcore ({__version__}) reads "
                         f"format_version 1 to {FORMAT_VERSION}")
    for key, kinds in (("epoch", (int, type(None))), ("step", (int, type(None))), ("extra", dict),
                       ("model_extra_states", dict), ("optimizer", (dict, type(None)))):
        if not isinstance(meta.get(key), kinds) or isinstance(meta.get(key), bool):
            raise _bad(path, f"metadata field {key!r} has the wrong type: {meta.get(key)!r}")
    used = {name for name in tensors if name.startswith("model.")}
    optimizer_state = None if meta["optimizer"] is None else _decode(path, meta["optimizer"], tensors, used)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise _bad(path, f"tensors {unknown} belong to neither the model nor the optimizer")
    return Checkpoint(
        model_state={name[6:]: tensors[name] for name in tensors if name.startswith("model.")},
        optimizer_state=optimizer_state,
        epoch=meta["epoch"],
        step=meta["step"],
        extra=meta["extra"],
        model_extra_states=meta["model_extra_states"],
        format_version=version,
        deepcore_version=meta.get("deepcore_version"),
    )


def _decode(path: Path, obj: Any, tensors: dict[str, np.ndarray], used: set[str]) -> Any:
    """Invert :func:`_encode`: markers back to arrays and tuples."""
    if isinstance(obj, list):
        return [_decode(path, v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__array__"}:
        name = obj["__array__"]
        if not isinstance(name, str) or not name.startswith("optimizer.") or name not in tensors:
            raise _bad(path, f"the optimizer metadata refers to tensor {name!r}, which the file lacks")
        used.add(name)
        return tensors[name]
    if set(obj) == {"__tuple__"} and isinstance(obj["__tuple__"], list):
        return tuple(_decode(path, v, tensors, used) for v in obj["__tuple__"])
    return {k: _decode(path, v, tensors, used) for k, v in obj.items()}
