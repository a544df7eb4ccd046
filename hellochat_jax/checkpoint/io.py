"""What every converter shares: tensor sources read one tensor at a time, key tables, streaming
placement onto target shardings, refusal of mismatched checkpoints, Orbax save/restore.

A key table is a list of ``KeyRule(theirs, ours, transform)``. Both sides are templates with
``{i}``/``{j}`` placeholders for layer indices, so one table serves import and export.
``ours`` is the dotted path of the nnx Variable in our module; ``None`` means the tensor is
known and deliberately not imported (e.g. torch buffers we recompute).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hellochat_jax.core import sharding as shd
from hellochat_jax.core.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that does not fit the model: names the offending keys."""


# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a tensor changes layout between their format and ours (and back)."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_theirs: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight [out, in] -> our kernel [in, out]
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T)
# torch Conv1d weight [out, in, k] -> ours [k, in, out] (lax.conv_general_dilated "WIO")
CONV1D = Transform("conv1d", lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))
# torch ConvTranspose1d weight [in, out, k] -> ours [k, in, out]
CONV_TRANSPOSE1D = Transform("conv_transpose1d", lambda x: x.transpose(2, 0, 1), lambda x: x.transpose(1, 2, 0))
# torch Conv2d weight [out, in, kh, kw] -> ours [kh, kw, in, out] ("HWIO")
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class KeyRule:
    theirs: str
    ours: str | None
    transform: Transform = IDENTITY


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]\})", template)
    regex = "".join(f"(?P<{p[1]}>\\d+)" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts)
    return re.compile(regex + "$")


class KeyTable:
    """A compiled key table: maps their keys to ours and back."""

    def __init__(self, rules: Sequence[KeyRule]):
        self.rules = list(rules)
        self._theirs = [(_template_regex(r.theirs), r) for r in self.rules]
        self._ours = [(_template_regex(r.ours), r) for r in self.rules if r.ours is not None]

    def to_ours(self, key: str) -> tuple[str | None, Transform] | None:
        """(our path or None for a skipped tensor, transform), or None for an unknown key."""
        for regex, rule in self._theirs:
            m = regex.match(key)
            if m:
                return (rule.ours.format(**m.groupdict()) if rule.ours else None), rule.transform
        return None

    def to_theirs(self, path: str) -> tuple[str, Transform] | None:
        for regex, rule in self._ours:
            m = regex.match(path)
            if m:
                return rule.theirs.format(**m.groupdict()), rule.transform
        return None


# ----------------------------------------------------------------------------- sources


class TensorSource:
    """A checkpoint read one tensor at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key))) * 4


def _check_safetensors_file(path: Path) -> None:
    """Catches truncated or non-safetensors files before the library's less helpful errors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header claims {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + end} bytes, the file has {size}"
        )


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _np_dtype(name: str):
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return _SAFETENSORS_DTYPES[name]


class SafetensorsSource(TensorSource):
    """One safetensors file, or a folder with model.safetensors / model.safetensors.index.json.

    Tensors are memory-mapped from the file, so reading one costs only that tensor's pages.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: not found")
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({path / f for f in weight_map.values()})
            elif single.exists():
                files = [single]
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors")
        else:
            files = [path]
        self._meta: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in the index but missing")
            _check_safetensors_file(f)
            header, data_start = _safetensors_header(f)
            for k, v in header.items():
                self._meta[k] = (f, data_start, v)

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key][2]["shape"])

    def dtype(self, key: str) -> str:
        return self._meta[key][2]["dtype"]

    def nbytes(self, key: str) -> int:
        a, b = self._meta[key][2]["data_offsets"]
        return b - a

    def get(self, key: str) -> np.ndarray:
        f, data_start, info = self._meta[key]
        a, b = info["data_offsets"]
        dtype = np.dtype(_np_dtype(info["dtype"]))
        shape = tuple(info["shape"])
        if b - a != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{f}: tensor {key} has {b - a} bytes, its shape {shape} needs {int(np.prod(shape)) * dtype.itemsize}")
        if b == a:
            return np.zeros(shape, dtype)
        return np.array(np.memmap(f, dtype=dtype, mode="r", offset=data_start + a, shape=shape))


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class TorchSource(TensorSource):
    """A torch state dict (``.pt``), read with ``weights_only=True`` so no pickled code runs."""

    def __init__(self, path: str | os.PathLike, state_dict_key: str | None = None):
        self.path = Path(path)
        self.extra: dict[str, Any] = {}
        try:
            import torch
        except ImportError as e:  # pragma: no cover
            raise CheckpointError(f"{path}: reading .pt files needs torch (pip install 'hellochat-jax[torch]')") from e
        if not self.path.exists():
            raise CheckpointError(f"{path}: file not found")
        import zipfile

        try:
            # mmap keeps host memory at one tensor at a time for zip-format (torch.save) files.
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
        except Exception as e:
            message = str(e)
            if "Weights only load failed" in message or type(e).__name__ == "UnpicklingError":
                raise CheckpointError(
                    f"{path}: refused: the file holds pickled objects other than tensors and plain "
                    f"containers (possibly code). Only state dicts are read (torch.load(weights_only=True))."
                ) from None
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {message.splitlines()[0]}") from None
        if state_dict_key is not None:
            if not isinstance(obj, Mapping) or state_dict_key not in obj:
                raise CheckpointError(f"{path}: expected a dict with key {state_dict_key!r}")
            self.extra = {k: v for k, v in obj.items() if k != state_dict_key}
            obj = obj[state_dict_key]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
        self._sd = {k: v for k, v in obj.items() if hasattr(v, "shape")}

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def nbytes(self, key: str) -> int:
        t = self._sd[key]
        return t.numel() * t.element_size()

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class DictSource(TensorSource):
    """An in-memory mapping (tests, or a key-renamed view of another source)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def keys(self):
        return list(self._t)

    def shape(self, key):
        return tuple(np.shape(self._t[key]))

    def get(self, key):
        return np.asarray(self._t[key])


class RenamedSource(TensorSource):
    """A view of another source under other key names: ``names`` maps each view key to the
    source key it reads (keys left out of ``names`` are not in the view)."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]):
        self.source, self.names = source, dict(names)

    def keys(self):
        return list(self.names)

    def shape(self, key):
        return self.source.shape(self.names[key])

    def nbytes(self, key):
        return self.source.nbytes(self.names[key])

    def get(self, key):
        return self.source.get(self.names[key])


def prefixed_source(source: TensorSource, prefix: str) -> RenamedSource:
    """Only the keys under ``prefix``, with the prefix removed."""
    return RenamedSource(source, {k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)})


def stripped_source(source: TensorSource, prefix: str) -> RenamedSource:
    """Every key, with ``prefix`` removed from those that start with it."""
    return RenamedSource(source, {k.removeprefix(prefix): k for k in source.keys()})


def drop_tied_copy(source: TensorSource, copy_key: str, of_key: str, what: str) -> TensorSource:
    """A tied weight some releases still store twice: the copy must equal the original, and is
    then left out (the model holds one tensor)."""
    keys = source.keys()
    if copy_key not in keys:
        return source
    if of_key in keys and not np.array_equal(source.get(copy_key), source.get(of_key)):
        raise CheckpointError(f"{what}: the weights are tied but {copy_key} differs from {of_key}")
    return RenamedSource(source, {k: k for k in keys if k != copy_key})


# ----------------------------------------------------------------------------- HF configs


def read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF-style folder (or the file itself), with errors naming the file."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def keep_stored_dtype(hf: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults param_dtype/dtype to the checkpoint's own dtype: round trips stay bit-exact and
    a bf16 release is not silently doubled in memory."""
    stored = hf.get("torch_dtype") or hf.get("dtype") or (hf.get("text_config") or {}).get("torch_dtype") or "float32"
    overrides.setdefault("param_dtype", "bfloat16" if stored == "bfloat16" else "float32")
    overrides.setdefault("dtype", overrides["param_dtype"])
    return overrides


# ----------------------------------------------------------------------------- streaming load


def variable_paths(state: nnx.State) -> dict[str, nnx.Variable]:
    """Flat ``{"a.b.0.kernel": Variable}`` view of a model state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = var
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def load_into(
    abstract: nnx.Module,
    source: TensorSource,
    table: KeyTable,
    mesh: jax.sharding.Mesh,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    what: str = "checkpoint",
    progress: bool = False,
    optional: Iterable[str] = (),
) -> nnx.Module:
    """Fills an abstract model (from ``nnx.eval_shape``) from ``source`` tensor by tensor.

    Each tensor is read, transformed, cast to the parameter dtype and ``device_put`` straight
    onto its NamedSharding; only one host tensor is alive at a time. Key sets and shapes are
    checked before any tensor is read, and every problem is reported at once, by name.
    ``optional`` lists our paths that may stay at their defaults (e.g. buffers).
    """
    graphdef, abstract_state = nnx.split(abstract)
    targets = variable_paths(abstract_state)
    shardings = variable_paths(shd.shardings_for(abstract_state, mesh, rules))

    plan: list[tuple[str, str, Transform]] = []
    unexpected, misshaped = [], []
    seen: dict[str, str] = {}
    for key in source.keys():
        mapped = table.to_ours(key)
        if mapped is None:
            unexpected.append(key)
            continue
        ours, transform = mapped
        if ours is None:
            continue
        if ours not in targets:
            unexpected.append(f"{key} (-> {ours}, which the model does not have)")
            continue
        if ours in seen:
            raise CheckpointError(f"{what}: {key} and {seen[ours]} both map to {ours}")
        seen[ours] = key
        want = tuple(targets[ours].shape)
        got = tuple(transform.to_ours(np.empty(source.shape(key), dtype=np.uint8)).shape)  # shape only
        if got != want:
            misshaped.append(f"{key}: checkpoint {source.shape(key)} -> {got}, model expects {want} ({ours})")
            continue
        plan.append((key, ours, transform))
    missing = [p for p in targets if p not in seen and p not in set(optional)]
    problems = []
    if missing:
        theirs = [table.to_theirs(p) for p in missing]
        names = [f"{t[0]} (our {p})" if t else p for p, t in zip(missing, theirs)]
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    if problems:
        raise CheckpointError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))

    values = {}
    for key, ours, transform in _progress(plan, len(plan), f"loading {what}", progress):
        host = transform.to_ours(source.get(key))
        dtype = targets[ours].dtype
        host = np.asarray(host, order="C").astype(dtype, copy=False)  # (ascontiguousarray would make 0-d scalars [1])
        if host.dtype.kind == "f" or host.dtype.name == "bfloat16":
            if not np.isfinite(host.astype(np.float32)).all():
                raise CheckpointError(f"{what}: {key} holds NaN or inf values")
        values[ours] = jax.device_put(host, shardings[ours])
        del host
    # Optional variables keep their default values, computed on device at their sharding.
    if any(p not in values for p in targets):
        defaults = _defaults_for(abstract, graphdef, targets, values, shardings)
        values.update(defaults)

    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        key = ".".join(str(p) for p in path)
        flat.append((path, var.replace(values[key])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _defaults_for(abstract, graphdef, targets, values, shardings):
    """Values for variables a checkpoint need not hold (e.g. recomputable buffers)."""
    factory = getattr(abstract, "_hellochat_factory", None)
    if factory is None:
        raise CheckpointError("optional variables need the model factory; pass it through abstract_with_factory")

    def init():
        return nnx.state(factory())

    state = jax.jit(init)()
    flat = variable_paths(state)
    return {p: jax.device_put(flat[p].get_value(), shardings[p]) for p in targets if p not in values}


def abstract_module(module_cls: Callable[..., nnx.Module], cfg: Any) -> nnx.Module:
    """``module_cls(cfg)``'s structure with shape-only leaves: what `load_into` fills."""
    return shd.abstract_model(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))


def abstract_with_factory(factory: Callable[[], nnx.Module]) -> nnx.Module:
    """``nnx.eval_shape(factory)`` that remembers the factory (for optional defaults)."""
    abstract = shd.abstract_model(factory)
    object.__setattr__(abstract, "_hellochat_factory", factory)
    return abstract


# ----------------------------------------------------------------------------- export


def export_tensors(model: nnx.Module, table: KeyTable, *, skip: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (their key, host array) one tensor at a time, gathering each from its shards."""
    skip = set(skip)
    for path, var in variable_paths(nnx.state(model)).items():
        if path in skip:
            continue
        mapped = table.to_theirs(path)
        if mapped is None:
            raise CheckpointError(f"no export rule for our variable {path}")
        key, transform = mapped
        value = var.get_value()
        host = np.asarray(jax.device_get(value))
        # np.asarray(order="C"), not ascontiguousarray: that one turns 0-d scalars into [1] arrays.
        yield key, np.asarray(transform.to_theirs(host), order="C")


def save_safetensors(tensors: Iterable[tuple[str, np.ndarray]], path: str | os.PathLike, *, max_shard_bytes: int | None = None, metadata: dict | None = None) -> None:
    """Writes tensors to model.safetensors (or shards with an index when max_shard_bytes is set)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        save_file(dict(tensors), str(path / "model.safetensors"), metadata=metadata or {"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors:
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=metadata or {"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def save_hf_folder(tensors: Iterable[tuple[str, np.ndarray]], hf_config: Mapping[str, Any], path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """An HF folder: config.json + model.safetensors (sharded with an index if asked)."""
    path = Path(path)
    save_safetensors(tensors, path, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(dict(hf_config), indent=2))
    return path


def to_torch(x: np.ndarray):
    """A host array as a torch tensor (bfloat16 kept; torch refuses read-only buffers)."""
    import torch

    x = np.array(x, copy=True, order="C")
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def torch_state_dict(tensors: Mapping[str, Any], order: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """A torch state dict from exported tensors, keys sorted by ``order`` (a release's own
    state-dict order, so its file compares equal key by key); torch tensors pass unchanged."""
    import torch

    keys = sorted(tensors, key=order) if order is not None else list(tensors)
    return {k: tensors[k] if isinstance(tensors[k], torch.Tensor) else to_torch(tensors[k]) for k in keys}


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to ``path``, creating its folder."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- orbax


META_FILE = "hellochat.json"


def save_orbax(model: nnx.Module, out_dir: str | os.PathLike, *, component: str, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Saves model state (sharded arrays written in parallel by Orbax) plus a small JSON
    describing how to rebuild the module."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model)
    # Bounding the device->host staging keeps a converter's peak memory near one model copy
    # (on CPU "devices" the model already lives in host RAM).
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=0.25)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(out_dir / "state", args=ocp.args.PyTreeSave(nnx.to_pure_dict(state)), force=True)
    if jax.process_index() == 0:
        (out_dir / META_FILE).write_text(
            json.dumps({"component": component, "config": dict(config), **(dict(extra) if extra else {})}, indent=2, default=str)
        )
    return out_dir


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    meta = Path(ckpt_dir) / META_FILE
    if not meta.exists():
        raise CheckpointError(f"{ckpt_dir}: not a hellochat checkpoint (no {META_FILE}); convert it first with `hellochat convert`")
    try:
        data = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: corrupt ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("component"), str) or not isinstance(data.get("config"), dict):
        raise CheckpointError(f"{meta}: corrupt (want a JSON object with \"component\" and \"config\")")
    return data


def restore_orbax(abstract: nnx.Module, ckpt_dir: str | os.PathLike, mesh: jax.sharding.Mesh, rules: shd.Rules = shd.DEFAULT_RULES) -> nnx.Module:
    """Restores onto this mesh's shardings, whatever mesh the checkpoint was saved from."""
    import orbax.checkpoint as ocp

    graphdef, abstract_state = nnx.split(abstract)
    shardings = shd.shardings_for(abstract_state, mesh, rules)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        nnx.to_pure_dict(shardings),
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(ckpt_dir).absolute() / "state", target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
