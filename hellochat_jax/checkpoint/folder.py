"""The model folder: what `hellochat export` and `hellochat convert midashenglm` write and what
`understand`, `generate`, `speak`, `chat` and training's `init_from` load.

    models/tiny/
      hellochat.json   {"component": "hellochat", "config": {part: config | null},
                        "parts": [...], "tokenizers": {"thinker": "tokenizer", ...}, "prompt": {...}}
      state/           Orbax: the HelloChat parameters, one tree keyed by part
                       (thinker.audio_encoder..., thinker.decoder..., talker..., flow..., hift...)
      tokenizer/       the thinker's HF tokenizer folder (chat template, audio special tokens)
      talker_tokenizer/ (with a talker) the speech LM's text tokenizer folder

The parameters are one Orbax tree, not one per part, so one restore places the whole model on
the mesh; the part names are its top-level keys. "prompt" keeps the conventions the model was
trained with (its system prompt), so a command can prompt it as training did.

Older single-component checkpoints (`hellochat.json` {component, config} beside `state/`) load
through the same call; qwen2 and midashenglm ones come back as a HelloChat (a text-only
thinker, or the whole thinker), others as their component module.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from hellochat_jax.checkpoint.io import (
    META_FILE,
    CheckpointError,
    read_meta,
    restore_orbax,
    save_orbax,
)
from hellochat_jax.components.hellochat.model import HelloChat, HelloChatConfig
from hellochat_jax.core import sharding as shd

FORMAT = 1
TOKENIZER_DIRS = {"thinker": "tokenizer", "talker": "talker_tokenizer"}
# What a tokenizer folder holds (HF fast and slow tokenizers); weights beside them are not copied.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclasses.dataclass
class ModelBundle:
    """A loaded model folder.

    model      HelloChat (any folder of the hellochat component, and wrapped qwen2/midashenglm
               checkpoints), or the bare module of another single-component checkpoint
    config     the model's config (HelloChatConfig for a HelloChat)
    component  "hellochat", or the old checkpoint's component name
    folder     where it was loaded from
    meta       the parsed hellochat.json
    """

    model: nnx.Module
    config: Any
    component: str
    folder: Path
    meta: dict[str, Any]

    def tokenizer_dir(self, part: str) -> Path | None:
        name = self.meta.get("tokenizers", {}).get(part)
        return self.folder / name if name else None

    @functools.cached_property
    def thinker_tokenizer(self):
        """The thinker's HF tokenizer (loaded on first use), or None if the folder has none."""
        return _load_tokenizer(self.tokenizer_dir("thinker"))

    @functools.cached_property
    def talker_tokenizer(self):
        """The talker's text tokenizer (loaded on first use), or None if the folder has none."""
        return _load_tokenizer(self.tokenizer_dir("talker"))

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the model was trained with ("" = none), or None if not recorded."""
        return self.meta.get("prompt", {}).get("system")


def _load_tokenizer(path: Path | None):
    if path is None:
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a MiDashengLM config.json beside it is unknown to transformers: harmless
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


def copy_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """Copies the tokenizer files of a local folder (and nothing else) into `out_dir`."""
    source, out_dir = Path(source), Path(out_dir)
    files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json") for f in files):
        raise CheckpointError(f"{source}: not a tokenizer folder (no tokenizer.json or vocab.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, out_dir / f.name)
    return out_dir


def save_model_folder(
    model: HelloChat,
    out_dir: str | Path,
    *,
    thinker_tokenizer: str | Path | None = None,
    talker_tokenizer: str | Path | None = None,
    prompt: dict[str, Any] | None = None,
) -> Path:
    """Writes a model folder: the parameters (Orbax), hellochat.json, and copies of the given
    tokenizer folders. Returns the folder."""
    out_dir = Path(out_dir)
    tokenizers = {}
    for part, source in (("thinker", thinker_tokenizer), ("talker", talker_tokenizer)):
        if source is not None and jax.process_index() == 0:
            copy_tokenizer(source, out_dir / TOKENIZER_DIRS[part])
        if source is not None:
            tokenizers[part] = TOKENIZER_DIRS[part]
    extra = {"format": FORMAT, "parts": model.cfg.parts, "tokenizers": tokenizers, "prompt": dict(prompt or {})}
    # hellochat.json is written last: a folder that has it is complete.
    return save_orbax(model, out_dir, component="hellochat", config=model.cfg.to_dict(), extra=extra)


def load_model_folder(
    folder: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
) -> ModelBundle:
    """Loads a model folder (or an older single-component checkpoint) onto `mesh` (default: all
    devices on `data`). Every problem with the folder is a `CheckpointError` naming the file.

    Returns a ModelBundle: `.model` (a HelloChat for model folders and qwen2/midashenglm
    checkpoints), `.config`, `.component`, `.folder`, `.meta`, `.thinker_tokenizer` and
    `.talker_tokenizer` (HF tokenizers, loaded on first use; None if absent), `.system_prompt`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    meta_path = folder / META_FILE
    meta = read_meta(folder)
    if not (folder / "state").is_dir():
        raise CheckpointError(f"{folder / 'state'}: missing (the parameters of {meta_path})")
    for part, name in meta.get("tokenizers", {}).items():
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder / name}: missing (the {part} tokenizer named in {meta_path})")
    mesh = mesh if mesh is not None else shd.make_mesh()
    component = meta["component"]
    if component == "hellochat":
        try:
            config = HelloChatConfig.from_dict(meta["config"])
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{meta_path}: bad config ({e})") from None
        model = restore_orbax(shd.abstract_model(lambda: HelloChat(config, rngs=nnx.Rngs(0))), folder, mesh, rules)
        return ModelBundle(model, config, component, folder, meta)

    from hellochat_jax.checkpoint.load import load_checkpoint

    try:
        component, config, module = load_checkpoint(folder, mesh, rules)
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{meta_path}: bad config ({e})") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{meta_path}: {e}") from None
    if component in ("qwen2", "midashenglm"):
        model, config = as_hellochat(component, config, module)
    else:
        model = module
    return ModelBundle(model, config, component, folder, meta)


def as_hellochat(component: str, config: Any, module: nnx.Module) -> tuple[HelloChat, HelloChatConfig]:
    """A loaded qwen2 (text-only thinker) or midashenglm module as a HelloChat (no copy)."""
    from hellochat_jax.components.midashenglm.model import MiDashengLMConfig

    if component == "qwen2":
        thinker_cfg = MiDashengLMConfig(audio_encoder=None, text=config, audio_token_id=None)
    else:
        thinker_cfg = config
    cfg = HelloChatConfig(thinker=thinker_cfg)
    model = shd.abstract_model(lambda: HelloChat(cfg, rngs=nnx.Rngs(0)))
    if component == "qwen2":
        model.thinker.decoder = module
    else:
        model.thinker = module
    return model, cfg


# Components whose release is a thinker (or its decoder): their conversions are model folders.
THINKER_COMPONENTS = ("qwen2", "midashenglm")


def save_thinker_folder(component: str, config: Any, module: nnx.Module, out_dir: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """A converted qwen2 / midashenglm module as a model folder; `tokenizer`, if it is a
    tokenizer folder (an HF release folder usually is), is copied in."""
    model, _ = as_hellochat(component, config, module)
    if tokenizer is not None and not any((Path(tokenizer) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        tokenizer = None
    return save_model_folder(model, out_dir, thinker_tokenizer=tokenizer)


def thinker_module(bundle: ModelBundle, component: str) -> tuple[Any, nnx.Module]:
    """(config, module) of a loaded folder's thinker as `component` wants it: "qwen2" its
    decoder, "midashenglm" the whole thinker (which must have its audio encoder)."""
    where = bundle.folder / META_FILE
    if not isinstance(bundle.model, HelloChat):
        raise CheckpointError(f"{where}: holds a {bundle.component!r} checkpoint, which has no thinker")
    thinker = bundle.model.thinker
    if component == "qwen2":
        return thinker.decoder.cfg, thinker.decoder
    if component != "midashenglm":
        raise ValueError(f"not a thinker component: {component!r}")
    if thinker.audio_encoder is None:
        raise CheckpointError(f"{where}: its thinker has no audio encoder (a text-only model)")
    return thinker.cfg, thinker
