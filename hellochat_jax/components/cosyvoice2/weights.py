"""A whole CosyVoice 2 release folder <-> a converted talker folder.

    hellochat convert cosyvoice2 --release CosyVoice2-0.5B --out talker/
    hellochat convert cosyvoice2 --talker talker/ --export --out release-again/

The release folder (as CosyVoice2-0.5B ships it):
    cosyvoice2.yaml          sizes of every part (read as data, never executed)
    llm.pt flow.pt hift.pt   the speech-token LM, flow decoder and vocoder state dicts
    CosyVoice-BlankEN/       the Qwen2 backbone's config.json and tokenizer files
    speech_tokenizer_v2.onnx S3Tokenizer v2 (read through the optional `s3tokenizer` package;
                             a speech_tokenizer_v2_25hz.pt in the package's format also works)
    campplus.onnx            the speaker-embedding network (run by onnxruntime, copied as is)

The converted folder:
    talker.json              manifest: which parts are here and what was copied
    llm/ flow/ hift/ [s3tokenizer/]   Orbax checkpoints (hellochat.json + state/)
    cosyvoice2.yaml, CosyVoice-BlankEN/ (without weight files), campplus.onnx,
    speech_tokenizer_v2.onnx         copied unchanged, for inference and for export
Export writes the release layout back (llm.pt, flow.pt, hift.pt bit-exactly).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.checkpoint.load import load_checkpoint, save_checkpoint
from hellochat_jax.core import sharding as shd

MANIFEST = "talker.json"
QWEN_FOLDER = "CosyVoice-BlankEN"
YAML_NAME = "cosyvoice2.yaml"
REQUIRED = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", QWEN_FOLDER)
S3_ONNX, S3_PT = "speech_tokenizer_v2.onnx", "speech_tokenizer_v2_25hz.pt"
COPIED = ("campplus.onnx", S3_ONNX)
# Weights of the plain Qwen2.5 model some releases keep in CosyVoice-BlankEN: llm.pt holds the
# backbone the talker uses, so they are not copied.
SKIPPED_IN_QWEN_FOLDER = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_release(release: Path) -> None:
    if not release.is_dir():
        raise CheckpointError(f"{release}: not a folder (expected a CosyVoice 2 release folder)")
    missing = [name for name in REQUIRED if not (release / name).exists()]
    if missing:
        raise CheckpointError(f"{release}: not a complete CosyVoice 2 release folder; missing {', '.join(missing)}")


def _copy_qwen_folder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(SKIPPED_IN_QWEN_FOLDER):
            shutil.copy2(f, dst / f.name)


def convert_release(
    release: str | os.PathLike,
    out: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    progress: bool = True,
    copy_onnx: bool = True,
) -> dict[str, Any]:
    """Converts every part of a release folder; returns the manifest written to talker.json."""
    from hellochat_jax.components.flow import weights as cosyvoice2_flow
    from hellochat_jax.components.hift import weights as cosyvoice2_hift
    from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm

    release, out = Path(release), Path(out)
    check_release(release)
    mesh = mesh if mesh is not None else shd.make_mesh()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": "hellochat-talker", "version": 1, "source": str(release.absolute()), "parts": {}, "copied": [], "notes": []}

    def save(part: str, component: str, cfg, model) -> None:
        save_checkpoint(model, cfg, out / part, component)
        manifest["parts"][part] = component

    steps = ["llm", "flow", "hift", "s3tokenizer", "files"]
    bar = _bar(steps, progress)
    for step in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(f"cosyvoice2: {step}")
        if step == "llm":
            cfg, model = cosyvoice2_llm.load(release, mesh, rules, progress=progress)
            save("llm", cosyvoice2_llm.COMPONENT, cfg, model)
        elif step == "flow":
            cfg, model = cosyvoice2_flow.load(release, mesh, rules, progress=progress)
            save("flow", "cosyvoice2-flow", cfg, model)
        elif step == "hift":
            cfg, model = cosyvoice2_hift.load(release, mesh, rules, progress=progress)
            save("hift", cosyvoice2_hift.COMPONENT, cfg, model)
        elif step == "s3tokenizer":
            note = _convert_s3tokenizer(release, out, mesh, rules, progress, manifest)
            if note:
                manifest["notes"].append(note)
        else:
            shutil.copy2(release / YAML_NAME, out / YAML_NAME)
            _copy_qwen_folder(release / QWEN_FOLDER, out / QWEN_FOLDER)
            for name in COPIED:
                if (release / name).exists() and (copy_onnx or name == "campplus.onnx"):
                    shutil.copy2(release / name, out / name)
                    manifest["copied"].append(name)
            if "campplus.onnx" not in manifest["copied"]:
                manifest["notes"].append("no campplus.onnx: voice prompts cannot give a speaker x-vector; speech uses the default (zero) speaker")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _convert_s3tokenizer(release: Path, out: Path, mesh, rules, progress: bool, manifest: dict) -> str | None:
    from hellochat_jax.components.s3tokenizer import weights as s3tokenizer

    source = release / S3_PT if (release / S3_PT).exists() else release / S3_ONNX if (release / S3_ONNX).exists() else None
    if source is None:
        return "no speech tokenizer in the release: voice prompts are unavailable"
    try:
        cfg, model = s3tokenizer.load(source, mesh, rules, progress=progress)
    except CheckpointError as e:
        if source.suffix == ".onnx" and "s3tokenizer" in str(e):
            return (
                f"{S3_ONNX} not converted: reading it needs the optional `s3tokenizer` package "
                "(pip install 'hellochat-jax[onnx]'); voice prompts are unavailable until it is converted"
            )
        raise
    save_checkpoint(model, cfg, out / "s3tokenizer", s3tokenizer.COMPONENT)
    manifest["parts"]["s3tokenizer"] = s3tokenizer.COMPONENT
    manifest["s3tokenizer_source"] = source.name  # export writes a .pt source back as .pt
    return None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a converted talker; convert it with `hellochat convert cosyvoice2`)")
    return json.loads(path.read_text())


def load_part(folder: str | os.PathLike, part: str, mesh: jax.sharding.Mesh, rules: shd.Rules = shd.DEFAULT_RULES, **overrides: Any):
    """(config, module) of one converted part (`llm`, `flow`, `hift`, `s3tokenizer`)."""
    from hellochat_jax.checkpoint.io import read_meta

    path = Path(folder) / part
    if part == "llm" and overrides:  # the speech LM's overrides are its Qwen2 backbone's
        overrides = {"qwen2": {**read_meta(path)["config"]["qwen2"], **overrides}}
    _, cfg, module = load_checkpoint(path, mesh, rules, **overrides)
    return cfg, module


def export_release(talker: str | os.PathLike, out: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *, progress: bool = True) -> Path:
    """Writes a release folder from a converted talker folder."""
    from hellochat_jax.checkpoint.cosyvoice_yaml import dump_cosyvoice_yaml
    from hellochat_jax.components.flow import weights as cosyvoice2_flow
    from hellochat_jax.components.hift import weights as cosyvoice2_hift
    from hellochat_jax.components.s3tokenizer import weights as s3tokenizer
    from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm

    talker, out = Path(talker), Path(out)
    manifest = read_manifest(talker)
    mesh = mesh if mesh is not None else shd.make_mesh()
    out.mkdir(parents=True, exist_ok=True)
    configs: dict[str, Any] = {}
    for part in _bar(["llm", "flow", "hift", "s3tokenizer"], progress):
        if part not in manifest["parts"]:
            continue
        cfg, model = load_part(talker, part, mesh)
        configs[part] = cfg
        if part == "llm":
            cosyvoice2_llm.export(model, cfg, out)
        elif part == "flow":
            cosyvoice2_flow.export(model, cfg, out)
        elif part == "hift":
            cosyvoice2_hift.export(model, cfg, out)
        elif manifest.get("s3tokenizer_source") == S3_PT:
            s3tokenizer.export(model, cfg, out / S3_PT)
            (out / "config.json").unlink(missing_ok=True)  # sizes are read off the tensors
    if (talker / YAML_NAME).exists():
        shutil.copy2(talker / YAML_NAME, out / YAML_NAME)  # the original, comments and all
    else:
        data = {**cosyvoice2_llm.yaml_section(configs["llm"]), "flow": cosyvoice2_flow.config_to_yaml(configs["flow"]), "hift": configs["hift"].to_yaml()}
        (out / YAML_NAME).write_text(dump_cosyvoice_yaml(data))
    if (talker / QWEN_FOLDER).exists():
        _copy_qwen_folder(talker / QWEN_FOLDER, out / QWEN_FOLDER)
    for name in COPIED:
        if (talker / name).exists():
            shutil.copy2(talker / name, out / name)
    return out


def _bar(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="part", dynamic_ncols=True)


# ----------------------------------------------------------------------------- CLI
