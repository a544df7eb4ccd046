"""CosyVoice 2 `hift.pt` (the release's HiFTGenerator state dict) <-> our HiFTVocoder.

`load` reads the release folder (cosyvoice2.yaml for the sizes + hift.pt, read with
torch.load(weights_only=True)), a hift.pt with the yaml beside it, or a folder written by
`checkpoint.load.save_checkpoint` (Orbax; what `hellochat convert cosyvoice2-hift` writes).
hift.pt comes in two namings of torch's weight norm, both accepted:

    <module>.parametrizations.weight.original0 / original1   (torch.nn.utils.parametrizations, current code)
    <module>.weight_g / <module>.weight_v                    (torch.nn.utils.weight_norm, older releases)

and possibly with "generator." before every key (a HiFiGan training checkpoint's generator);
CosyVoice2Model.load strips it, so do we. Which naming and prefix the file used is recorded in
the config, and `export` writes the same form back.

Weight norm and the bit-exact round trip: folding W = g * v / ||v|| into a plain kernel at import
loses ||v|| (only the direction of v survives), so a folded model cannot write back the file's
v, only some v' = W with g' = ||W||, which differs from the original bits. We therefore keep g and
v themselves as the model's parameters (v transposed to [taps, in, out], g flattened; both pure
re-layouts, exactly invertible) and fold inside the forward pass, where it costs a few
reductions per call. Export is then the inverse re-layout of the very same bits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from hellochat_jax.checkpoint.cosyvoice_yaml import load_cosyvoice_yaml
from hellochat_jax.checkpoint.io import CONV1D, CONV_TRANSPOSE1D, IDENTITY, TRANSPOSE, CheckpointError, KeyRule, KeyTable
from hellochat_jax.checkpoint.io import TensorSource, TorchSource, Transform, export_tensors, save_torch, stripped_source, torch_state_dict
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.hift.model import HiFTConfig, HiFTVocoder

COMPONENT = "cosyvoice2-hift"
PT_NAME = "hift.pt"
YAML_NAME = "cosyvoice2.yaml"
PREFIX = "generator."

# weight_norm's g has torch shape [dim0, 1, 1]; ours is [dim0].
WN_GAIN = Transform("weight_norm_g", lambda g: g.reshape(-1), lambda g: g.reshape(-1, 1, 1))

G = ".parametrizations.weight.original0"  # weight-norm magnitude g
V = ".parametrizations.weight.original1"  # weight-norm direction v
LEGACY = {G: ".weight_g", V: ".weight_v"}

# hift.pt key (theirs, current naming) -> our variable path; {i} = stage / block, {j} = dilation.
HIFT_KEYS = [
    KeyRule("m_source.l_linear.weight", "m_source.l_linear.kernel", TRANSPOSE),
    KeyRule("m_source.l_linear.bias", "m_source.l_linear.bias", IDENTITY),
    KeyRule("conv_pre.bias", "conv_pre.bias", IDENTITY),
    KeyRule("conv_pre" + G, "conv_pre.g", WN_GAIN),
    KeyRule("conv_pre" + V, "conv_pre.v", CONV1D),
    KeyRule("ups.{i}.bias", "ups.{i}.bias", IDENTITY),
    KeyRule("ups.{i}" + G, "ups.{i}.g", WN_GAIN),  # per INPUT channel (dim 0 of [in, out, taps])
    KeyRule("ups.{i}" + V, "ups.{i}.v", CONV_TRANSPOSE1D),
    KeyRule("source_downs.{i}.weight", "source_downs.{i}.kernel", CONV1D),  # no weight norm
    KeyRule("source_downs.{i}.bias", "source_downs.{i}.bias", IDENTITY),
    *[
        rule
        for blocks in ("source_resblocks", "resblocks")
        for rule in (
            KeyRule(blocks + ".{i}.convs1.{j}.bias", blocks + ".{i}.convs1.{j}.bias", IDENTITY),
            KeyRule(blocks + ".{i}.convs1.{j}" + G, blocks + ".{i}.convs1.{j}.g", WN_GAIN),
            KeyRule(blocks + ".{i}.convs1.{j}" + V, blocks + ".{i}.convs1.{j}.v", CONV1D),
            KeyRule(blocks + ".{i}.convs2.{j}.bias", blocks + ".{i}.convs2.{j}.bias", IDENTITY),
            KeyRule(blocks + ".{i}.convs2.{j}" + G, blocks + ".{i}.convs2.{j}.g", WN_GAIN),
            KeyRule(blocks + ".{i}.convs2.{j}" + V, blocks + ".{i}.convs2.{j}.v", CONV1D),
            KeyRule(blocks + ".{i}.activations1.{j}.alpha", blocks + ".{i}.activations1.{j}.alpha", IDENTITY),
            KeyRule(blocks + ".{i}.activations2.{j}.alpha", blocks + ".{i}.activations2.{j}.alpha", IDENTITY),
        )
    ],
    KeyRule("conv_post.bias", "conv_post.bias", IDENTITY),
    KeyRule("conv_post" + G, "conv_post.g", WN_GAIN),
    KeyRule("conv_post" + V, "conv_post.v", CONV1D),
    # condnet is nn.Sequential(conv, ELU, conv, ELU, ...): the convs sit at the even indices.
    *[
        rule
        for ours, theirs in enumerate((0, 2, 4, 6, 8))
        for rule in (
            KeyRule(f"f0_predictor.condnet.{theirs}.bias", f"f0_predictor.convs.{ours}.bias", IDENTITY),
            KeyRule(f"f0_predictor.condnet.{theirs}" + G, f"f0_predictor.convs.{ours}.g", WN_GAIN),
            KeyRule(f"f0_predictor.condnet.{theirs}" + V, f"f0_predictor.convs.{ours}.v", CONV1D),
        )
    ],
    KeyRule("f0_predictor.classifier.weight", "f0_predictor.classifier.kernel", TRANSPOSE),
    KeyRule("f0_predictor.classifier.bias", "f0_predictor.classifier.bias", IDENTITY),
]


def key_rules(naming: str = "parametrizations", prefix: str = "") -> list[KeyRule]:
    """HIFT_KEYS in the given weight-norm naming ("parametrizations" or "legacy"), with a prefix."""
    rules = []
    for rule in HIFT_KEYS:
        theirs = rule.theirs
        if naming == "legacy":
            for new, old in LEGACY.items():
                theirs = theirs.replace(new, old)
        rules.append(dataclasses.replace(rule, theirs=prefix + theirs))
    return rules


# ----------------------------------------------------------------------------- reading


def detect_format(keys: list[str]) -> tuple[str, str]:
    """(weight-norm naming, key prefix) of a hift state dict; mixed namings are refused."""
    prefix = PREFIX if keys and all(k.startswith(PREFIX) for k in keys) else ""
    legacy = [k for k in keys if k.endswith((".weight_g", ".weight_v"))]
    current = [k for k in keys if ".parametrizations.weight.original" in k]
    if legacy and current:
        raise CheckpointError(
            f"hift state dict mixes weight-norm namings: e.g. {legacy[0]} (weight_g/weight_v) and {current[0]} (parametrizations)"
        )
    return ("legacy" if legacy else "parametrizations"), prefix


def _find_files(path: Path) -> tuple[Path, Path]:
    """(hift.pt, cosyvoice2.yaml) for a release folder or a hift.pt with the yaml beside it."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    pt = path / PT_NAME if path.is_dir() else path
    yaml = pt.parent / YAML_NAME
    if not pt.exists():
        raise CheckpointError(f"{path}: no {PT_NAME}")
    if not yaml.exists():
        raise CheckpointError(f"{pt.parent}: no {YAML_NAME} beside {pt.name} (the vocoder's sizes come from its `hift:` section)")
    return pt, yaml


def config_from_yaml(yaml_path: str | os.PathLike, **overrides: Any) -> HiFTConfig:
    """HiFTConfig from the `hift:` section of a cosyvoice2.yaml (parsed as data, nothing run)."""
    try:
        data = load_cosyvoice_yaml(yaml_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{yaml_path}: {e}") from None
    if "hift" not in data:
        raise CheckpointError(f"{yaml_path}: no `hift:` section")
    try:
        return HiFTConfig.from_yaml(data["hift"], **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{yaml_path}: hift: {e}") from None


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[HiFTConfig, TensorSource, str]:
    """A release folder, or a hift.pt with cosyvoice2.yaml beside it."""
    pt, yaml = _find_files(Path(path))
    return config_from_yaml(yaml, **overrides), TorchSource(pt), str(pt)


def prepare_source(cfg: HiFTConfig, source: TensorSource, what: str) -> tuple[HiFTConfig, TensorSource, KeyTable]:
    """Any accepted naming and prefix; the config records which, so export writes the same form."""
    naming, prefix = detect_format(source.keys())
    cfg = dataclasses.replace(cfg, checkpoint_naming=naming, checkpoint_prefix=prefix)
    return cfg, stripped_source(source, PREFIX), KeyTable(key_rules(naming))


# (config, HiFTVocoder) from a release folder, a hift.pt or a converted folder:
# checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


# ----------------------------------------------------------------------------- export

# torch's state-dict order: modules in registration order, inside a weight-normed module the
# bias before the parametrization (registered later); a plain module's weight before its bias.
_MODULE_ORDER = {
    "m_source": 0, "conv_pre": 1, "ups": 2, "source_downs": 3, "source_resblocks": 4, "resblocks": 5,
    "conv_post": 6, "f0_predictor": 7, "l_linear": 0, "condnet": 0, "classifier": 1,
    "convs1": 0, "convs2": 1, "activations1": 2, "activations2": 3,
    "weight": 0, "bias": 1, "alpha": 0, "parametrizations": 2, "weight_g": 2, "weight_v": 3,
    "original0": 0, "original1": 1,
}


def _reference_order(key: str) -> tuple:
    parts = key.removeprefix(PREFIX).split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, _MODULE_ORDER.get(p, 99)) for p in parts)


def export_state_dict(model: HiFTVocoder, cfg: HiFTConfig) -> dict[str, Any]:
    """hift.pt's state dict (torch tensors) in the naming and prefix recorded in `cfg`."""
    if model.is_folded:
        raise CheckpointError("this HiFTVocoder has its weight norm folded (fold_weight_norm); export the unfolded model")
    table = KeyTable(key_rules(cfg.checkpoint_naming, cfg.checkpoint_prefix))
    return torch_state_dict(dict(export_tensors(model, table)), _reference_order)


def export(model: HiFTVocoder, cfg: HiFTConfig, path: str | os.PathLike) -> Path:
    """Writes hift.pt (to `path` if it ends in .pt, else to path/hift.pt). Returns the file."""
    path = Path(path)
    return save_torch(export_state_dict(model, cfg), path if path.suffix == ".pt" else path / PT_NAME)


# ----------------------------------------------------------------------------- CLI
