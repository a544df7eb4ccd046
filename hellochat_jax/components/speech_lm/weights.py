"""CosyVoice 2 release `llm.pt` (+ `cosyvoice2.yaml` and `CosyVoice-BlankEN/config.json`)
<-> our SpeechTokenLM.

`llm.pt` is the plain state dict of their Qwen2LM: three small tables of its own and the
Qwen2 backbone under `llm.model.` (their Qwen2Encoder holds a transformers
Qwen2ForCausalLM as `.model`). The backbone rows are the thinker's HF table (QWEN2_KEYS) with
that prefix, so there is one Qwen2 key table in the project. The release stores the tied text
LM head too (`llm.model.lm_head.weight`, equal to the text embedding); it is checked, dropped
on import and written back on export. Sizes come from the yaml's `llm:` section (read as data,
never executed) and the backbone's config.json; the dtype from the tensors in llm.pt.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from hellochat_jax.checkpoint.cosyvoice_yaml import Tagged, load_cosyvoice_yaml
from hellochat_jax.checkpoint.io import IDENTITY, TRANSPOSE, CheckpointError, KeyRule, KeyTable, TensorSource, TorchSource
from hellochat_jax.checkpoint.io import drop_tied_copy, export_tensors, save_torch, torch_state_dict
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.qwen2.weights import QWEN2_KEYS
from hellochat_jax.components.speech_lm.model import SpeechTokenLM, SpeechTokenLMConfig, cosyvoice_ras

COMPONENT = "cosyvoice2-llm"
QWEN_FOLDER = "CosyVoice-BlankEN"
TEXT_LM_HEAD = "llm.model.lm_head.weight"
TEXT_EMBEDDING = "llm.model.model.embed_tokens.weight"


def _backbone_rules() -> list[KeyRule]:
    """QWEN2_KEYS' decoder rows moved under their `llm.model.` and our `llm.` (a Qwen2Model,
    so the thinker's `model.` prefix on our side goes)."""
    rules = []
    for r in QWEN2_KEYS:
        if r.theirs.startswith("model."):
            ours = None if r.ours is None else r.ours.removeprefix("model.")
            rules.append(KeyRule("llm.model." + r.theirs, None if ours is None else "llm." + ours, r.transform))
    return rules


# llm.pt key (theirs) -> our variable path. {i} is the decoder layer.
SPEECH_LM_KEYS = [
    KeyRule("llm_embedding.weight", "llm_embedding.embedding", IDENTITY),  # [2, D]: sos, task id
    *_backbone_rules(),  # llm.model.model.* -> llm.*  (text embedding, layers, final norm)
    KeyRule("llm_decoder.weight", "llm_decoder.kernel", TRANSPOSE),  # [S+3, D] -> [D, S+3]
    KeyRule("llm_decoder.bias", "llm_decoder.bias", IDENTITY),
    KeyRule("speech_embedding.weight", "speech_embedding.embedding", IDENTITY),  # [S+3, D]
]
# The backbone's text LM head: unused by the speech LM. Tied (the release): a copy of the text
# embedding, checked and dropped on import (drop_tied_copy). Untied: kept as a frozen
# (untrained) tensor for export.
UNTIED_HEAD = KeyRule(TEXT_LM_HEAD, "text_lm_head", IDENTITY)


def key_table(cfg: SpeechTokenLMConfig) -> KeyTable:
    return KeyTable(SPEECH_LM_KEYS + ([UNTIED_HEAD] if cfg.keep_text_lm_head else []))


def _dtype_name(source: TensorSource, key: str) -> str:
    dt = source.get(key).dtype
    if dt == np.float32:
        return "float32"
    if dt.name == "bfloat16":
        return "bfloat16"
    raise CheckpointError(f"{key}: dtype {dt} is not supported (float32 or bfloat16)")


def llm_section(yaml_data: dict[str, Any], where: str) -> Tagged:
    node = yaml_data.get("llm")
    if not isinstance(node, Tagged) or node.kind != "new":
        raise CheckpointError(f"{where}: no `llm: !new:...` section")
    if node.cls != "Qwen2LM":
        raise CheckpointError(f"{where}: llm is {node.target}; only CosyVoice 2's Qwen2LM is supported")
    return node


def read_config(release: str | os.PathLike, source: TensorSource | None = None, **qwen2_overrides: Any) -> SpeechTokenLMConfig:
    """Config from a release folder: cosyvoice2.yaml's `llm:` + CosyVoice-BlankEN/config.json."""
    from hellochat_jax.components.qwen2 import weights as hf_qwen2

    release = Path(release)
    yaml_path = release / "cosyvoice2.yaml"
    if not yaml_path.exists():
        raise CheckpointError(f"{release}: no cosyvoice2.yaml (not a CosyVoice 2 release folder)")
    qwen_dir = release / QWEN_FOLDER
    node = llm_section(load_cosyvoice_yaml(yaml_path, overrides={"qwen_pretrain_path": str(qwen_dir)}), str(yaml_path))
    if source is not None:
        dtype = _dtype_name(source, "llm_decoder.weight")
        qwen2_overrides.setdefault("param_dtype", dtype)
        qwen2_overrides.setdefault("dtype", qwen2_overrides["param_dtype"])
    qwen2 = hf_qwen2.read_config(qwen_dir, **qwen2_overrides)
    for name in ("llm_input_size", "llm_output_size"):
        if int(node[name]) != qwen2.hidden_size:
            raise CheckpointError(f"{yaml_path}: llm.{name}={node[name]} but the Qwen2 backbone's hidden_size is {qwen2.hidden_size}")
    sampling = node.get("sampling")
    if isinstance(sampling, Tagged):
        if sampling.cls != "ras_sampling":
            raise CheckpointError(f"{yaml_path}: llm.sampling is {sampling.target}; only ras_sampling is supported")
        known = {k: sampling.value[k] for k in ("top_p", "top_k", "win_size", "tau_r") if isinstance(sampling.value, dict) and k in sampling.value}
        ras = cosyvoice_ras(**known)
    else:
        ras = cosyvoice_ras()
    keep_head = False
    if source is not None and not qwen2.tie_word_embeddings and TEXT_LM_HEAD in source.keys():
        keep_head = True
    return SpeechTokenLMConfig(
        qwen2=qwen2,
        speech_token_size=int(node["speech_token_size"]),
        length_normalized_loss=bool(node.get("length_normalized_loss", True)),
        lsm_weight=float(node.get("lsm_weight", 0.0)),
        mix_ratio=tuple(node.get("mix_ratio", (5, 15))),
        sampling=ras,
        keep_text_lm_head=keep_head,
    )


def open_release(path: str | os.PathLike, **qwen2_overrides: Any) -> tuple[SpeechTokenLMConfig, TensorSource, str]:
    """llm.pt of a CosyVoice 2 release folder (or a folder laid out like one); overrides go to
    the Qwen2 backbone's config."""
    weights = Path(path) / "llm.pt"
    source = TorchSource(weights)
    return read_config(path, source, **qwen2_overrides), source, str(weights)


def prepare_source(cfg: SpeechTokenLMConfig, source: TensorSource, what: str) -> tuple[SpeechTokenLMConfig, TensorSource, KeyTable]:
    if not cfg.keep_text_lm_head:
        source = drop_tied_copy(source, TEXT_LM_HEAD, TEXT_EMBEDDING, what)
    return cfg, source, key_table(cfg)


# (config, SpeechTokenLM) from a release folder or a converted one: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


def _reference_order(cfg: SpeechTokenLMConfig) -> list[str]:
    """Key order of their state dict (module registration order)."""
    layer = [
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    ]
    keys = ["llm_embedding.weight", "llm.model.model.embed_tokens.weight"]
    for i in range(cfg.qwen2.num_hidden_layers):
        keys += [f"llm.model.model.layers.{i}.{k}" for k in layer]
    keys += ["llm.model.model.norm.weight", TEXT_LM_HEAD, "llm_decoder.weight", "llm_decoder.bias", "speech_embedding.weight"]
    return keys


def export_state_dict(model: SpeechTokenLM, cfg: SpeechTokenLMConfig) -> dict[str, Any]:
    """Their state dict (torch tensors), in their key order."""
    tensors = dict(export_tensors(model, key_table(cfg)))
    if not cfg.keep_text_lm_head:
        tensors[TEXT_LM_HEAD] = tensors[TEXT_EMBEDDING]
    order = {k: n for n, k in enumerate(_reference_order(cfg))}
    return torch_state_dict(tensors, lambda k: order.get(k, len(order)))


def export(model: SpeechTokenLM, cfg: SpeechTokenLMConfig, path: str | os.PathLike) -> Path:
    """Writes llm.pt into a release folder (and CosyVoice-BlankEN/config.json if absent)."""
    import json

    path = Path(path)
    save_torch(export_state_dict(model, cfg), path / "llm.pt")
    qwen_cfg = path / QWEN_FOLDER / "config.json"
    if not qwen_cfg.exists():
        qwen_cfg.parent.mkdir(parents=True, exist_ok=True)
        hf = cfg.qwen2.to_hf()
        hf["torch_dtype"] = cfg.qwen2.param_dtype
        qwen_cfg.write_text(json.dumps(hf, indent=2))
    return path


def yaml_section(cfg: SpeechTokenLMConfig) -> dict[str, Any]:
    """The `llm:` entry of cosyvoice2.yaml for this config (as `Tagged` data)."""
    return {
        "llm": Tagged("new", "cosyvoice.llm.llm.Qwen2LM", {
            "llm_input_size": cfg.hidden_size,
            "llm_output_size": cfg.hidden_size,
            "speech_token_size": cfg.speech_token_size,
            "length_normalized_loss": cfg.length_normalized_loss,
            "lsm_weight": cfg.lsm_weight,
            "mix_ratio": list(cfg.mix_ratio),
            "llm": Tagged("new", "cosyvoice.llm.llm.Qwen2Encoder", {"pretrain_path": QWEN_FOLDER}),
            "sampling": Tagged("name", "cosyvoice.utils.common.ras_sampling", {
                "top_p": cfg.sampling.top_p, "top_k": cfg.sampling.top_k,
                "win_size": cfg.sampling.win_size, "tau_r": cfg.sampling.tau_r,
            }),
        }),
    }
