"""Tiny CosyVoice 2 release folders with random weights, for tests and the README.

A release folder holds what CosyVoice2-0.5B ships: `cosyvoice2.yaml` (hyperpyyaml), `llm.pt`,
`flow.pt`, `hift.pt` (plain state dicts), `CosyVoice-BlankEN/` (the Qwen2 backbone's
config.json and tokenizer) and optionally `campplus.onnx` / `speech_tokenizer_v2.onnx`.
The tensors here are written straight in the reference's key names and layouts (numpy +
torch.save), independently of our converters, so a load -> export round trip tests them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hellochat_jax.checkpoint.cosyvoice_yaml import Tagged, dump_cosyvoice_yaml

QWEN_FOLDER = "CosyVoice-BlankEN"


def _save_torch(tensors: dict[str, np.ndarray], path: Path, dtype: str = "float32") -> None:
    import torch

    out = {}
    for k, v in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(v, np.float32))
        out[k] = t.to(torch.bfloat16) if dtype == "bfloat16" else t
    torch.save(out, path)


def tiny_qwen2_config(hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64, vocab: int = 320, tied: bool = True) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": tied, "use_sliding_window": False, "sliding_window": None,
        "rope_scaling": None, "attention_dropout": 0.0, "use_cache": True,
    }


def llm_state_dict(qwen: dict[str, Any], speech_token_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Qwen2LM state dict in the reference's key order (tied head stored twice)."""
    rng = np.random.default_rng(seed)
    d, v, s3 = qwen["hidden_size"], qwen["vocab_size"], speech_token_size + 3
    hd = d // qwen["num_attention_heads"]
    h, kv, m = qwen["num_attention_heads"] * hd, qwen["num_key_value_heads"] * hd, qwen["intermediate_size"]

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sd = {"llm_embedding.weight": w(2, d, scale=0.5), "llm.model.model.embed_tokens.weight": w(v, d, scale=0.5)}
    for i in range(qwen["num_hidden_layers"]):
        p = f"llm.model.model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(h, d), p + "self_attn.q_proj.bias": w(h, scale=0.1),
            p + "self_attn.k_proj.weight": w(kv, d), p + "self_attn.k_proj.bias": w(kv, scale=0.1),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.v_proj.bias": w(kv, scale=0.1),
            p + "self_attn.o_proj.weight": w(d, h), p + "mlp.gate_proj.weight": w(m, d),
            p + "mlp.up_proj.weight": w(m, d), p + "mlp.down_proj.weight": w(d, m),
            p + "input_layernorm.weight": 1.0 + w(d, scale=0.1), p + "post_attention_layernorm.weight": 1.0 + w(d, scale=0.1),
        }
    sd["llm.model.model.norm.weight"] = 1.0 + w(d, scale=0.1)
    sd["llm.model.lm_head.weight"] = sd["llm.model.model.embed_tokens.weight"].copy() if qwen["tie_word_embeddings"] else w(v, d)
    sd["llm_decoder.weight"] = w(s3, d)
    sd["llm_decoder.bias"] = w(s3, scale=0.1)
    sd["speech_embedding.weight"] = w(s3, d, scale=0.5)
    return sd


def llm_yaml(hidden: int, speech_token_size: int) -> dict[str, Any]:
    return {
        "llm_input_size": hidden,
        "llm_output_size": hidden,
        "qwen_pretrain_path": "",
        "llm": Tagged("new", "cosyvoice.llm.llm.Qwen2LM", {
            "llm_input_size": hidden, "llm_output_size": hidden, "speech_token_size": speech_token_size,
            "length_normalized_loss": True, "lsm_weight": 0, "mix_ratio": [5, 15],
            "llm": Tagged("new", "cosyvoice.llm.llm.Qwen2Encoder", {"pretrain_path": ""}),
            "sampling": Tagged("name", "cosyvoice.utils.common.ras_sampling", {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}),
        }),
    }


def make_tiny_llm(
    folder: str | os.PathLike,
    *,
    speech_token_size: int = 97,
    seed: int = 0,
    dtype: str = "float32",
    **qwen: Any,
) -> Path:
    """Writes llm.pt, CosyVoice-BlankEN/config.json and the yaml's `llm:` section (merged into
    an existing cosyvoice2.yaml)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_qwen2_config(**qwen)
    (folder / QWEN_FOLDER).mkdir(exist_ok=True)
    (folder / QWEN_FOLDER / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_torch(llm_state_dict(cfg, speech_token_size, seed), folder / "llm.pt", dtype)
    merge_yaml(folder, llm_yaml(cfg["hidden_size"], speech_token_size))
    return folder


def merge_yaml(folder: Path, sections: dict[str, Any]) -> None:
    from hellochat_jax.checkpoint.cosyvoice_yaml import load_cosyvoice_yaml

    path = Path(folder) / "cosyvoice2.yaml"
    data = load_cosyvoice_yaml(path) if path.exists() else {}
    data.update(sections)
    path.write_text(dump_cosyvoice_yaml(data))


# ----------------------------------------------------------------------------- the other parts
# Flow, vocoder and speech tokenizer are drawn with our modules' random initialisation and
# written by their exporters (their own tests check those against the reference fixtures).


def _init(factory, seed: int):
    """A module with random numpy weights (no compile, no per-parameter dispatch): norms'
    scales and weight-norm gains near 1, biases small, other tensors ~ N(0, 1 / fan_in)."""
    from flax import nnx

    from hellochat_jax.checkpoint.io import variable_paths
    from hellochat_jax.core import sharding as shd

    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(shd.abstract_model(factory))
    for path, var in variable_paths(state).items():
        shape, name = tuple(var.shape), path.rsplit(".", 1)[-1]
        if name in ("scale", "g", "alpha") or len(shape) == 0:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias" or len(shape) == 1:
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        var.set_value(np.asarray(value, dtype=var.dtype))
    return nnx.merge(graphdef, state)


def tiny_flow_config(vocab_size: int = 6561):
    from hellochat_jax.components.flow.conformer import UpsampleEncoderConfig
    from hellochat_jax.components.flow.model import EstimatorConfig, FlowConfig

    enc = UpsampleEncoderConfig(input_size=40, output_size=40, attention_heads=2, linear_units=80, num_blocks=2, static_chunk_size=25)
    est = EstimatorConfig(in_channels=320, out_channels=80, channels=(24,), attention_head_dim=16, n_blocks=1, num_mid_blocks=2, num_heads=2, static_chunk_size=50)
    return FlowConfig(input_size=40, output_size=80, spk_embed_dim=192, vocab_size=vocab_size, encoder=enc, estimator=est)


def tiny_hift_config():
    from hellochat_jax.components.hift.model import HiFTConfig

    return HiFTConfig(base_channels=32, f0_cond_channels=32)


def make_tiny_flow(folder: str | os.PathLike, *, vocab_size: int = 6561, seed: int = 1) -> Path:
    from flax import nnx

    from hellochat_jax.components.flow import weights as cosyvoice2_flow
    from hellochat_jax.components.flow.model import FlowDecoder

    cfg = tiny_flow_config(vocab_size)
    cosyvoice2_flow.export(_init(lambda: FlowDecoder(cfg, rngs=nnx.Rngs(seed)), seed), cfg, folder)
    return Path(folder)


def make_tiny_hift(folder: str | os.PathLike, *, seed: int = 2) -> Path:
    from flax import nnx

    from hellochat_jax.components.hift import weights as cosyvoice2_hift
    from hellochat_jax.components.hift.model import HiFTVocoder

    cfg = tiny_hift_config()
    cosyvoice2_hift.export(_init(lambda: HiFTVocoder(cfg, rngs=nnx.Rngs(seed)), seed), cfg, folder)
    merge_yaml(Path(folder), {"hift": cfg.to_yaml()})
    return Path(folder)


def make_tiny_s3tokenizer(folder: str | os.PathLike, *, seed: int = 3) -> Path:
    """speech_tokenizer_v2_25hz.pt in the `s3tokenizer` package's format (1 block, width 64);
    the converter reads the sizes off the tensors."""
    from flax import nnx

    from hellochat_jax.components.s3tokenizer import weights as s3tokenizer
    from hellochat_jax.components.s3tokenizer.model import (
        S3Tokenizer,
        S3TokenizerConfig,
    )

    cfg = S3TokenizerConfig(n_audio_state=64, n_audio_head=1, n_audio_layer=1)
    pt = s3tokenizer.export(_init(lambda: S3Tokenizer(cfg, rngs=nnx.Rngs(seed)), seed), cfg, Path(folder) / "speech_tokenizer_v2_25hz.pt")
    (pt.parent / "config.json").unlink(missing_ok=True)
    return pt


def make_campplus_onnx(path: str | os.PathLike, *, dim: int = 192, seed: int = 4) -> Path:
    """A stand-in for campplus.onnx with its interface: fbank [1, T, 80] -> x-vector [1, dim]
    (mean over time, a random projection, tanh). Needs the `onnx` package."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((80, dim)).astype(np.float32) * 0.3
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["projected"]),
            helper.make_node("Tanh", ["projected"], ["output"]),
        ],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, dim])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Path(path)


def make_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level BPE tokenizer with no merges (any text encodes, one token per UTF-8 byte),
    saved the way transformers' AutoTokenizer reads it (ids 0..255 bytes, 256 <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return Path(folder)


def make_tiny_release(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    campplus: bool = True,
    speech_tokenizer: bool = True,
    hidden: int = 32,
    layers: int = 2,
) -> Path:
    """A complete tiny CosyVoice 2 release folder: real layout, random weights.

    Speech-token vocabulary 6561 (the S3Tokenizer v2 codebook, so prompt tokens fit the LM and
    the flow); text vocabulary 320 (256 bytes + <|endoftext|> + the 19 special tokens CosyVoice
    2's tokenizer adds). campplus.onnx is a stand-in with the real interface (needs `onnx`).
    """
    folder = Path(folder)
    make_tiny_llm(folder, speech_token_size=6561, seed=seed, hidden=hidden, layers=layers, heads=4, kv_heads=2, intermediate=2 * hidden, vocab=320)
    make_tiny_tokenizer(folder / QWEN_FOLDER)
    make_tiny_flow(folder, seed=seed + 1)
    make_tiny_hift(folder, seed=seed + 2)
    if speech_tokenizer:
        make_tiny_s3tokenizer(folder, seed=seed + 3)
    if campplus:
        make_campplus_onnx(folder / "campplus.onnx", seed=seed + 4)
    return folder
