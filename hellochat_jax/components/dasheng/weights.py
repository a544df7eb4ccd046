"""Dasheng release checkpoint (``.pt`` = {"model": state_dict, "config": kwargs}) <-> our
DashengEncoder.

The file is read with ``torch.load(weights_only=True)``: plain tensors and the config dict, no
pickled code. The front end's window and mel bank buffers are not parameters for us (they
follow from the config); on import they are checked against what the config implies, on
export they are recomputed the way torchaudio computes them, so a round trip is bit-exact.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from hellochat_jax.checkpoint.io import CONV2D, TRANSPOSE, CheckpointError, KeyRule, KeyTable, TensorSource, TorchSource
from hellochat_jax.checkpoint.io import Transform, export_tensors, save_torch, torch_state_dict
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.dasheng.model import DashengConfig, DashengEncoder, hann_window, mel_filterbank

COMPONENT = "dasheng"

# time_pos_embed [1, D, 1, T] -> ours [T, D]; freq_pos_embed [1, D, F, 1] -> ours [F, D]
TIME_POS = Transform("time_pos", lambda x: x[0, :, 0, :].T, lambda x: x.T[None, :, None, :])
FREQ_POS = Transform("freq_pos", lambda x: x[0, :, :, 0].T, lambda x: x.T[None, :, :, None])
# fused qkv Linear weight [3D, D] -> ours [D, 3, D] (q/k/v on axis 1); bias [3D] -> [3, D]
QKV = Transform("qkv", lambda w: w.T.reshape(w.shape[1], 3, -1), lambda k: k.reshape(k.shape[0], -1).T)
QKV_BIAS = Transform("qkv_bias", lambda b: b.reshape(3, -1), lambda b: b.reshape(-1))
# BatchNorm's step counter: int64 in torch, int32 for us (jax without x64).
COUNTER = Transform("counter", lambda x: x.astype(np.int32), lambda x: np.asarray(x, np.int64))

# release key -> our variable path, in the release's state-dict order; {i} = block index
DASHENG_KEYS = [
    KeyRule("time_pos_embed", "time_pos_embed", TIME_POS),
    KeyRule("freq_pos_embed", "freq_pos_embed", FREQ_POS),
    # torchaudio buffers, recomputed from the config (checked on import)
    KeyRule("front_end.0.spectrogram.window", None),
    KeyRule("front_end.0.mel_scale.fb", None),
    KeyRule("init_bn.1.weight", "init_bn.scale"),
    KeyRule("init_bn.1.bias", "init_bn.bias"),
    KeyRule("init_bn.1.running_mean", "init_bn.mean"),
    KeyRule("init_bn.1.running_var", "init_bn.var"),
    KeyRule("init_bn.1.num_batches_tracked", "init_bn.num_batches_tracked", COUNTER),
    KeyRule("patch_embed.proj.weight", "patch_kernel", CONV2D),
    KeyRule("patch_embed.proj.bias", "patch_bias"),
    KeyRule("blocks.{i}.norm1.weight", "blocks.{i}.norm1.scale"),
    KeyRule("blocks.{i}.norm1.bias", "blocks.{i}.norm1.bias"),
    KeyRule("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv_kernel", QKV),
    KeyRule("blocks.{i}.attn.qkv.bias", "blocks.{i}.attn.qkv_bias", QKV_BIAS),
    KeyRule("blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.kernel", TRANSPOSE),
    KeyRule("blocks.{i}.attn.proj.bias", "blocks.{i}.attn.proj.bias"),
    KeyRule("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),
    KeyRule("blocks.{i}.norm2.weight", "blocks.{i}.norm2.scale"),
    KeyRule("blocks.{i}.norm2.bias", "blocks.{i}.norm2.bias"),
    KeyRule("blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.kernel", TRANSPOSE),
    KeyRule("blocks.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
    KeyRule("blocks.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.kernel", TRANSPOSE),
    KeyRule("blocks.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias"),
    KeyRule("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"),
    KeyRule("norm.weight", "norm.scale"),
    KeyRule("norm.bias", "norm.bias"),
]
TABLE = KeyTable(DASHENG_KEYS)
WINDOW_KEY, MEL_FB_KEY = "front_end.0.spectrogram.window", "front_end.0.mel_scale.fb"


def check_front_end(source: TensorSource, cfg: DashengConfig, *, window_key: str = WINDOW_KEY, fb_key: str = MEL_FB_KEY, what: str = "checkpoint") -> None:
    """Stored front-end buffers must be the ones the config implies (we recompute them)."""
    for key, ours in ((window_key, hann_window(cfg)), (fb_key, mel_filterbank(cfg))):
        if key not in source.keys():
            continue
        theirs = np.asarray(source.get(key), np.float32)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-4, atol=1e-5):
            raise CheckpointError(
                f"{what}: {key} {theirs.shape} differs from the {ours.shape} buffer its config implies "
                "(n_fft, win_size, n_mels, f_min, f_max, sample_rate); a modified front end is not supported"
            )


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[DashengConfig, TensorSource, str]:
    """A dasheng release ``.pt``: {"model": state dict, "config": constructor kwargs}."""
    source = TorchSource(path, state_dict_key="model")
    config = source.extra.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: no 'config' dict next to 'model' (not a dasheng release checkpoint)")
    try:
        return DashengConfig.from_release(config, **overrides), source, str(path)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def prepare_source(cfg: DashengConfig, source: TensorSource, what: str) -> tuple[DashengConfig, TensorSource, KeyTable]:
    check_front_end(source, cfg, what=what)
    return cfg, source, TABLE


# (config, DashengEncoder) from a release .pt or a converted folder: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


def torchaudio_buffers(cfg: DashengConfig):
    """(window, mel bank) exactly as torchaudio's MelSpectrogram builds them (float32 torch ops
    in the same order), for a release file that its reference loads strictly."""
    import torch

    window = torch.hann_window(cfg.win_size)
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    freqs = torch.linspace(0, cfg.sample_rate // 2, cfg.n_fft // 2 + 1)
    mels = torch.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    slopes = edges.unsqueeze(0) - freqs.unsqueeze(1)
    down = (-1.0 * slopes[:, :-2]) / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return window, torch.max(torch.zeros(1), torch.min(down, up))


def _release_order(key: str) -> tuple[int, int, int]:
    """State-dict order of the release module: top-level keys as in the table, blocks by index."""
    position = {rule.theirs: n for n, rule in enumerate(DASHENG_KEYS)}
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if block:
        first_block = min(n for name, n in position.items() if name.startswith("blocks."))
        return first_block, int(block[1]), position["blocks.{i}." + block[2]]
    return position[key], 0, 0


def state_dict(model: DashengEncoder, cfg: DashengConfig) -> "OrderedDict[str, Any]":
    """Our encoder as the release's torch state dict (front-end buffers included)."""
    tensors = dict(export_tensors(model, TABLE))
    tensors[WINDOW_KEY], tensors[MEL_FB_KEY] = torchaudio_buffers(cfg)
    return OrderedDict(torch_state_dict(tensors, _release_order))


def export(model: DashengEncoder, cfg: DashengConfig, path: str | os.PathLike) -> Path:
    """Writes a release ``.pt`` that ``dasheng.pretrained.Dasheng.from_pretrained`` loads."""
    return save_torch({"model": state_dict(model, cfg), "config": cfg.to_release()}, path)


# ----------------------------------------------------------------------------- CLI
