"""S3Tokenizer v2 checkpoints (the `s3tokenizer` package's torch state dict, or the released
`speech_tokenizer_v2.onnx`) <-> our S3Tokenizer.

Accepted inputs of `load`:
  * a `.pt` state dict in the package's naming (what its `onnx2torch()` produces), read with
    torch.load(weights_only=True); a `config.json` beside it (the package's ModelConfig) is used
    when present, otherwise the sizes are read off the tensor shapes;
  * a `.onnx` release file, read through the package's own `s3tokenizer.utils.onnx2torch`
    (optional extra: pip install 'hellochat-jax[onnx]'); no ONNX parsing of our own;
  * a folder holding one of those (e.g. the CosyVoice2 release folder), or a folder that
    `hellochat convert s3tokenizer` wrote (Orbax).
`export` writes the package's `.pt` (+ config.json) back, tensor for tensor.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from hellochat_jax.checkpoint.io import CONV1D, IDENTITY, TRANSPOSE, CheckpointError, DictSource, KeyRule, KeyTable
from hellochat_jax.checkpoint.io import TensorSource, TorchSource, export_tensors, save_torch, torch_state_dict
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.s3tokenizer.model import ROPE_DIM, S3Tokenizer, S3TokenizerConfig

COMPONENT = "s3tokenizer-v2"
PT_NAME = "speech_tokenizer_v2_25hz.pt"
ONNX_NAME = "speech_tokenizer_v2.onnx"

# Package key (theirs) -> our variable path, in the package's state-dict order; {i} = block.
S3TOKENIZER_KEYS = [
    KeyRule("encoder.conv1.weight", "conv1.kernel", CONV1D),
    KeyRule("encoder.conv1.bias", "conv1.bias", IDENTITY),
    KeyRule("encoder.conv2.weight", "conv2.kernel", CONV1D),
    KeyRule("encoder.conv2.bias", "conv2.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.attn.query.weight", "blocks.{i}.attn.query.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.attn.query.bias", "blocks.{i}.attn.query.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.attn.key.weight", "blocks.{i}.attn.key.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.attn.value.weight", "blocks.{i}.attn.value.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.attn.value.bias", "blocks.{i}.attn.value.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.attn.out.weight", "blocks.{i}.attn.out.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.attn.out.bias", "blocks.{i}.attn.out.bias", IDENTITY),
    # depthwise [D, 1, 31] -> [31, 1, D]
    KeyRule("encoder.blocks.{i}.attn.fsmn_block.weight", "blocks.{i}.attn.fsmn.kernel", CONV1D),
    KeyRule("encoder.blocks.{i}.attn_ln.weight", "blocks.{i}.attn_ln.scale", IDENTITY),
    KeyRule("encoder.blocks.{i}.attn_ln.bias", "blocks.{i}.attn_ln.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.mlp.0.weight", "blocks.{i}.mlp_in.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.mlp.0.bias", "blocks.{i}.mlp_in.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.mlp.2.weight", "blocks.{i}.mlp_out.kernel", TRANSPOSE),
    KeyRule("encoder.blocks.{i}.mlp.2.bias", "blocks.{i}.mlp_out.bias", IDENTITY),
    KeyRule("encoder.blocks.{i}.mlp_ln.weight", "blocks.{i}.mlp_ln.scale", IDENTITY),
    KeyRule("encoder.blocks.{i}.mlp_ln.bias", "blocks.{i}.mlp_ln.bias", IDENTITY),
    KeyRule("quantizer._codebook.project_down.weight", "fsq_proj.kernel", TRANSPOSE),
    KeyRule("quantizer._codebook.project_down.bias", "fsq_proj.bias", IDENTITY),
]
TABLE = KeyTable(S3TOKENIZER_KEYS)


# ----------------------------------------------------------------------------- reading


def onnx_source(path: str | os.PathLike) -> DictSource:
    """The released ONNX through the `s3tokenizer` package's own reader (onnx2torch)."""
    try:
        from s3tokenizer.utils import onnx2torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading the released .onnx needs the `s3tokenizer` package (and its onnx/torchaudio "
            f"dependencies): pip install 'hellochat-jax[onnx]'. Alternatively convert it to a .pt elsewhere with "
            f"s3tokenizer.onnx2torch(onnx_path, torch_path) and pass the .pt. ({e})"
        ) from None
    state = onnx2torch(str(path), None, False)
    return DictSource({k: v.detach().cpu().numpy() for k, v in state.items()})


def infer_config(source: TensorSource, **overrides: Any) -> S3TokenizerConfig:
    """Sizes from tensor shapes (the release ONNX carries no config); heads = width / 64."""
    keys = set(source.keys())
    if "encoder.conv1.weight" not in keys:
        raise CheckpointError("not an S3Tokenizer v2 checkpoint: no encoder.conv1.weight")
    width, n_mels, _ = source.shape("encoder.conv1.weight")
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    ref = dict(n_mels=n_mels, n_audio_state=width, n_audio_head=max(1, width // ROPE_DIM), n_audio_layer=len(blocks))
    return S3TokenizerConfig.from_reference(ref, **overrides)


def _find_checkpoint(folder: Path) -> Path:
    """In a folder: speech_tokenizer*.pt, else speech_tokenizer*.onnx, else a single .pt/.onnx."""
    for pattern in ("speech_tokenizer*.pt", "speech_tokenizer*.onnx", "*.pt", "*.onnx"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{folder}: several candidate checkpoints {[f.name for f in found]}; pass the file")
    raise CheckpointError(f"{folder}: no S3Tokenizer checkpoint (speech_tokenizer*.pt / .onnx) found")


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[S3TokenizerConfig, TensorSource, str]:
    """A .pt, a .onnx, or a folder holding one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if path.is_dir():
        path = _find_checkpoint(path)
    if path.suffix == ".onnx":
        source: TensorSource = onnx_source(path)
    else:
        source = TorchSource(path)
    cfg_file = path.parent / "config.json"
    if cfg_file.exists():
        try:
            ref = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
        try:
            cfg = S3TokenizerConfig.from_reference(ref, **overrides)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    else:
        cfg = infer_config(source, **overrides)
    return cfg, source, str(path)


def prepare_source(cfg: S3TokenizerConfig, source: TensorSource, what: str) -> tuple[S3TokenizerConfig, TensorSource, KeyTable]:
    return cfg, source, TABLE


# (config, S3Tokenizer) from any form above: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


# ----------------------------------------------------------------------------- export


def _reference_order(key: str) -> tuple[int, int, int]:
    """The package's state-dict order: convs, blocks by index, quantizer; rules in table order."""
    for rank, rule in enumerate(S3TOKENIZER_KEYS):
        m = re.fullmatch(re.escape(rule.theirs).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            group = 0 if key.startswith("encoder.conv") else 2 if key.startswith("quantizer") else 1
            return group, int(m.group(1)) if m.groups() else 0, rank
    return 3, 0, 0


def export_state_dict(model: S3Tokenizer) -> dict[str, Any]:
    """The package's state dict (torch tensors), gathered one tensor at a time."""
    return torch_state_dict(dict(export_tensors(model, TABLE)), _reference_order)


def export(model: S3Tokenizer, cfg: S3TokenizerConfig, path: str | os.PathLike) -> Path:
    """Writes the package's format and returns the .pt path: into a folder, speech_tokenizer_v2_25hz.pt
    plus config.json (the package's ModelConfig); to a path ending in .pt, that file alone (e.g.
    into a release folder: the sizes are read back off the tensor shapes)."""
    path = Path(path)
    pt = save_torch(export_state_dict(model), path if path.suffix == ".pt" else path / PT_NAME)
    if path.suffix != ".pt":
        (path / "config.json").write_text(json.dumps(cfg.to_reference(), indent=2))
    return pt


# ----------------------------------------------------------------------------- CLI
