"""CosyVoice 2 release flow (`cosyvoice2.yaml` `flow:` section + `flow.pt`) <-> our FlowDecoder.

The yaml is read as data (convert/cosyvoice2_yaml.py; nothing imported or executed) and turned
into a FlowConfig; flow.pt is read with torch.load(weights_only=True) and streamed tensor by
tensor onto the target shardings through the key table below. The flow has no weight norm
anywhere, so there is no weight_g/weight_v or parametrizations naming to accept here.
Export writes flow.pt (and the yaml's `flow:` entry) back in the release layout, bit-exactly.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from hellochat_jax.checkpoint.cosyvoice_yaml import Tagged, dump_cosyvoice_yaml, load_cosyvoice_yaml
from hellochat_jax.checkpoint.io import CONV1D, CONV_TRANSPOSE1D, IDENTITY, TRANSPOSE, CheckpointError, KeyRule, KeyTable
from hellochat_jax.checkpoint.io import TensorSource, TorchSource, abstract_module, export_tensors, save_torch, torch_state_dict, variable_paths
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.flow.conformer import UpsampleEncoderConfig
from hellochat_jax.components.flow.model import EstimatorConfig, FlowConfig, FlowDecoder

COMPONENT = "cosyvoice2-flow"
YAML_NAME = "cosyvoice2.yaml"
WEIGHTS_NAME = "flow.pt"


def _conformer_layer_keys(stack: str) -> list[KeyRule]:
    """One conformer layer of `encoder.encoders` or `encoder.up_encoders` ({i} = layer)."""
    theirs, ours = f"encoder.{stack}.{{i}}", f"encoder.{stack}.{{i}}"
    rows = []
    for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
        rows += [
            KeyRule(f"{theirs}.self_attn.{proj}.weight", f"{ours}.self_attn.{proj}.kernel", TRANSPOSE),
            KeyRule(f"{theirs}.self_attn.{proj}.bias", f"{ours}.self_attn.{proj}.bias", IDENTITY),
        ]
    rows += [
        KeyRule(f"{theirs}.self_attn.linear_pos.weight", f"{ours}.self_attn.linear_pos.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.self_attn.pos_bias_u", f"{ours}.self_attn.pos_bias_u", IDENTITY),
        KeyRule(f"{theirs}.self_attn.pos_bias_v", f"{ours}.self_attn.pos_bias_v", IDENTITY),
        KeyRule(f"{theirs}.feed_forward.w_1.weight", f"{ours}.feed_forward.w_1.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.feed_forward.w_1.bias", f"{ours}.feed_forward.w_1.bias", IDENTITY),
        KeyRule(f"{theirs}.feed_forward.w_2.weight", f"{ours}.feed_forward.w_2.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.feed_forward.w_2.bias", f"{ours}.feed_forward.w_2.bias", IDENTITY),
        KeyRule(f"{theirs}.norm_mha.weight", f"{ours}.norm_mha.scale", IDENTITY),
        KeyRule(f"{theirs}.norm_mha.bias", f"{ours}.norm_mha.bias", IDENTITY),
        KeyRule(f"{theirs}.norm_ff.weight", f"{ours}.norm_ff.scale", IDENTITY),
        KeyRule(f"{theirs}.norm_ff.bias", f"{ours}.norm_ff.bias", IDENTITY),
    ]
    return rows


def _linear_embed_keys(name: str) -> list[KeyRule]:
    """LinearNoSubsampling `out` = Sequential(Linear, LayerNorm, Dropout)."""
    return [
        KeyRule(f"encoder.{name}.out.0.weight", f"encoder.{name}.linear.kernel", TRANSPOSE),
        KeyRule(f"encoder.{name}.out.0.bias", f"encoder.{name}.linear.bias", IDENTITY),
        KeyRule(f"encoder.{name}.out.1.weight", f"encoder.{name}.norm.scale", IDENTITY),
        KeyRule(f"encoder.{name}.out.1.bias", f"encoder.{name}.norm.bias", IDENTITY),
    ]


def _resnet_keys(theirs: str, ours: str) -> list[KeyRule]:
    """CausalResnetBlock1D: block{1,2}.block = Sequential(CausalConv1d, Transpose, LayerNorm, Transpose, Mish)."""
    rows = []
    for blk in ("block1", "block2"):
        rows += [
            KeyRule(f"{theirs}.{blk}.block.0.weight", f"{ours}.{blk}.conv.kernel", CONV1D),
            KeyRule(f"{theirs}.{blk}.block.0.bias", f"{ours}.{blk}.conv.bias", IDENTITY),
            KeyRule(f"{theirs}.{blk}.block.2.weight", f"{ours}.{blk}.norm.scale", IDENTITY),
            KeyRule(f"{theirs}.{blk}.block.2.bias", f"{ours}.{blk}.norm.bias", IDENTITY),
        ]
    rows += [
        KeyRule(f"{theirs}.mlp.1.weight", f"{ours}.mlp.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.mlp.1.bias", f"{ours}.mlp.bias", IDENTITY),
        KeyRule(f"{theirs}.res_conv.weight", f"{ours}.res_conv.kernel", CONV1D),
        KeyRule(f"{theirs}.res_conv.bias", f"{ours}.res_conv.bias", IDENTITY),
    ]
    return rows


def _transformer_keys(theirs: str, ours: str) -> list[KeyRule]:
    """matcha BasicTransformerBlock ({j} = block within the stage)."""
    return [
        KeyRule(f"{theirs}.norm1.weight", f"{ours}.norm1.scale", IDENTITY),
        KeyRule(f"{theirs}.norm1.bias", f"{ours}.norm1.bias", IDENTITY),
        KeyRule(f"{theirs}.attn1.to_q.weight", f"{ours}.attn1.to_q.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.attn1.to_k.weight", f"{ours}.attn1.to_k.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.attn1.to_v.weight", f"{ours}.attn1.to_v.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.attn1.to_out.0.weight", f"{ours}.attn1.to_out.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.attn1.to_out.0.bias", f"{ours}.attn1.to_out.bias", IDENTITY),
        KeyRule(f"{theirs}.norm3.weight", f"{ours}.norm3.scale", IDENTITY),
        KeyRule(f"{theirs}.norm3.bias", f"{ours}.norm3.bias", IDENTITY),
        KeyRule(f"{theirs}.ff.net.0.proj.weight", f"{ours}.ff.proj.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.ff.net.0.proj.bias", f"{ours}.ff.proj.bias", IDENTITY),
        KeyRule(f"{theirs}.ff.net.2.weight", f"{ours}.ff.out.kernel", TRANSPOSE),
        KeyRule(f"{theirs}.ff.net.2.bias", f"{ours}.ff.out.bias", IDENTITY),
    ]


EST = "decoder.estimator"

# flow.pt key (theirs) -> our variable path. {i} = layer / U-Net level, {j} = block in a stage.
FLOW_KEYS: list[KeyRule] = [
    KeyRule("input_embedding.weight", "input_embedding.embedding", IDENTITY),
    KeyRule("spk_embed_affine_layer.weight", "spk_embed_affine_layer.kernel", TRANSPOSE),
    KeyRule("spk_embed_affine_layer.bias", "spk_embed_affine_layer.bias", IDENTITY),
    # --- UpsampleConformerEncoder
    *_linear_embed_keys("embed"),
    KeyRule("encoder.pre_lookahead_layer.conv1.weight", "encoder.pre_lookahead_layer.conv1.kernel", CONV1D),
    KeyRule("encoder.pre_lookahead_layer.conv1.bias", "encoder.pre_lookahead_layer.conv1.bias", IDENTITY),
    KeyRule("encoder.pre_lookahead_layer.conv2.weight", "encoder.pre_lookahead_layer.conv2.kernel", CONV1D),
    KeyRule("encoder.pre_lookahead_layer.conv2.bias", "encoder.pre_lookahead_layer.conv2.bias", IDENTITY),
    *_conformer_layer_keys("encoders"),
    KeyRule("encoder.up_layer.conv.weight", "encoder.up_layer.conv.kernel", CONV1D),
    KeyRule("encoder.up_layer.conv.bias", "encoder.up_layer.conv.bias", IDENTITY),
    *_linear_embed_keys("up_embed"),
    *_conformer_layer_keys("up_encoders"),
    KeyRule("encoder.after_norm.weight", "encoder.after_norm.scale", IDENTITY),
    KeyRule("encoder.after_norm.bias", "encoder.after_norm.bias", IDENTITY),
    KeyRule("encoder_proj.weight", "encoder_proj.kernel", TRANSPOSE),
    KeyRule("encoder_proj.bias", "encoder_proj.bias", IDENTITY),
    # --- CausalConditionalDecoder (the CFM's estimator); stage lists are [resnet, transformers, resample]
    KeyRule(f"{EST}.time_mlp.linear_1.weight", "estimator.time_mlp.linear_1.kernel", TRANSPOSE),
    KeyRule(f"{EST}.time_mlp.linear_1.bias", "estimator.time_mlp.linear_1.bias", IDENTITY),
    KeyRule(f"{EST}.time_mlp.linear_2.weight", "estimator.time_mlp.linear_2.kernel", TRANSPOSE),
    KeyRule(f"{EST}.time_mlp.linear_2.bias", "estimator.time_mlp.linear_2.bias", IDENTITY),
    *_resnet_keys(f"{EST}.down_blocks.{{i}}.0", "estimator.down_blocks.{i}.resnet"),
    *_transformer_keys(f"{EST}.down_blocks.{{i}}.1.{{j}}", "estimator.down_blocks.{i}.transformer_blocks.{j}"),
    # deepest level: CausalConv1d; other levels: Downsample1D (.conv)
    KeyRule(f"{EST}.down_blocks.{{i}}.2.weight", "estimator.down_blocks.{i}.downsample.kernel", CONV1D),
    KeyRule(f"{EST}.down_blocks.{{i}}.2.bias", "estimator.down_blocks.{i}.downsample.bias", IDENTITY),
    KeyRule(f"{EST}.down_blocks.{{i}}.2.conv.weight", "estimator.down_blocks.{i}.downsample.conv.kernel", CONV1D),
    KeyRule(f"{EST}.down_blocks.{{i}}.2.conv.bias", "estimator.down_blocks.{i}.downsample.conv.bias", IDENTITY),
    *_resnet_keys(f"{EST}.mid_blocks.{{i}}.0", "estimator.mid_blocks.{i}.resnet"),
    *_transformer_keys(f"{EST}.mid_blocks.{{i}}.1.{{j}}", "estimator.mid_blocks.{i}.transformer_blocks.{j}"),
    *_resnet_keys(f"{EST}.up_blocks.{{i}}.0", "estimator.up_blocks.{i}.resnet"),
    *_transformer_keys(f"{EST}.up_blocks.{{i}}.1.{{j}}", "estimator.up_blocks.{i}.transformer_blocks.{j}"),
    # last level: CausalConv1d; other levels: Upsample1D (.conv = ConvTranspose1d)
    KeyRule(f"{EST}.up_blocks.{{i}}.2.weight", "estimator.up_blocks.{i}.upsample.kernel", CONV1D),
    KeyRule(f"{EST}.up_blocks.{{i}}.2.bias", "estimator.up_blocks.{i}.upsample.bias", IDENTITY),
    KeyRule(f"{EST}.up_blocks.{{i}}.2.conv.weight", "estimator.up_blocks.{i}.upsample.conv.kernel", CONV_TRANSPOSE1D),
    KeyRule(f"{EST}.up_blocks.{{i}}.2.conv.bias", "estimator.up_blocks.{i}.upsample.conv.bias", IDENTITY),
    KeyRule(f"{EST}.final_block.block.0.weight", "estimator.final_block.conv.kernel", CONV1D),
    KeyRule(f"{EST}.final_block.block.0.bias", "estimator.final_block.conv.bias", IDENTITY),
    KeyRule(f"{EST}.final_block.block.2.weight", "estimator.final_block.norm.scale", IDENTITY),
    KeyRule(f"{EST}.final_block.block.2.bias", "estimator.final_block.norm.bias", IDENTITY),
    KeyRule(f"{EST}.final_proj.weight", "estimator.final_proj.kernel", CONV1D),
    KeyRule(f"{EST}.final_proj.bias", "estimator.final_proj.bias", IDENTITY),
]
TABLE = KeyTable(FLOW_KEYS)


# ----------------------------------------------------------------------------- yaml <-> config

# Constructor defaults of the reference classes (ace7c47), used where the yaml omits an argument.
_FLOW_DEFAULTS = dict(input_size=512, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=4096,
                      input_frame_rate=50, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3)
_ENCODER_DEFAULTS = dict(output_size=256, attention_heads=4, linear_units=2048, num_blocks=6, dropout_rate=0.1,
                         positional_dropout_rate=0.1, attention_dropout_rate=0.0, input_layer="conv2d",
                         pos_enc_layer_type="rel_pos", normalize_before=True, static_chunk_size=0,
                         use_dynamic_chunk=False, global_cmvn=None, use_dynamic_left_chunk=False,
                         positionwise_conv_kernel_size=1, macaron_style=True, selfattention_layer_type="rel_selfattn",
                         activation_type="swish", use_cnn_module=True, cnn_module_kernel=15, causal=False,
                         cnn_module_norm="batch_norm", key_bias=True, gradient_checkpointing=False)
_ESTIMATOR_DEFAULTS = dict(channels=[256, 256], dropout=0.05, attention_head_dim=64, n_blocks=1, num_mid_blocks=2,
                           num_heads=4, act_fn="snake", static_chunk_size=50, num_decoding_left_chunks=2)
# Encoder settings this port implements; anything else is refused by name.
_ENCODER_REQUIRED = dict(input_layer="linear", pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
                         normalize_before=True, macaron_style=False, use_cnn_module=False, activation_type="swish",
                         use_dynamic_chunk=False, key_bias=True, global_cmvn=None)


def _kwargs(node: Any, cls: str, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(node, Tagged) or node.kind != "new" or node.cls != cls:
        got = f"!{node.kind}:{node.target}" if isinstance(node, Tagged) else repr(node)
        raise CheckpointError(f"{where}: expected !new:...{cls}, got {got}")
    args = dict(node.value or {})
    unknown = sorted(set(args) - set(defaults) - {"encoder", "decoder", "decoder_conf", "in_channels", "out_channels"})
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls} argument(s) {unknown}")
    return {**defaults, **args}


def config_from_yaml(data: dict[str, Any], **overrides: Any) -> FlowConfig:
    """FlowConfig from a parsed cosyvoice2.yaml (load_cosyvoice_yaml) holding a `flow:` entry."""
    if "flow" not in data:
        raise CheckpointError("cosyvoice2.yaml has no `flow:` section")
    flow = _kwargs(data["flow"], "CausalMaskedDiffWithXvec", _FLOW_DEFAULTS, "flow")
    if flow["output_type"] != "mel":
        raise CheckpointError(f"flow.output_type {flow['output_type']!r} is not supported (mel)")
    enc = _kwargs(flow.get("encoder"), "UpsampleConformerEncoder", {**_ENCODER_DEFAULTS, "input_size": None}, "flow.encoder")
    for name, want in _ENCODER_REQUIRED.items():
        if enc[name] != want:
            raise CheckpointError(f"flow.encoder.{name} = {enc[name]!r} is not supported (this port implements {want!r})")
    cfm = flow.get("decoder")
    if not isinstance(cfm, Tagged) or cfm.cls != "CausalConditionalCFM":
        raise CheckpointError(f"flow.decoder: expected !new:...CausalConditionalCFM, got {cfm!r}")
    params = cfm.get("cfm_params")
    params = params.get("content", params.value) if isinstance(params, Tagged) else params
    if not isinstance(params, dict):
        raise CheckpointError("flow.decoder.cfm_params: expected a DictConfig mapping")
    if params.get("solver", "euler") != "euler":
        raise CheckpointError(f"flow.decoder.cfm_params.solver {params['solver']!r} is not supported (euler)")
    if int(cfm.get("n_spks", 1)) != 1:
        raise CheckpointError("flow.decoder.n_spks must be 1")
    est_node = cfm.get("estimator")
    est = _kwargs(est_node, "CausalConditionalDecoder", {**_ESTIMATOR_DEFAULTS, "in_channels": None, "out_channels": None}, "flow.decoder.estimator")
    spk_emb_dim = int(cfm.get("spk_emb_dim", 64))
    if spk_emb_dim != flow["output_size"]:
        raise CheckpointError(f"flow.decoder.spk_emb_dim {spk_emb_dim} != flow.output_size {flow['output_size']}")

    try:
        return _build_config(flow, enc, est, params, overrides)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"flow config: {e}") from None


def _build_config(flow: dict, enc: dict, est: dict, params: dict, overrides: dict) -> FlowConfig:
    stride = int(flow["token_mel_ratio"])
    encoder = UpsampleEncoderConfig(
        input_size=int(enc["input_size"] if enc["input_size"] is not None else flow["input_size"]),
        output_size=int(enc["output_size"]),
        attention_heads=int(enc["attention_heads"]),
        linear_units=int(enc["linear_units"]),
        num_blocks=int(enc["num_blocks"]),
        pre_lookahead_len=int(flow["pre_lookahead_len"]),
        upsample_stride=stride,
        static_chunk_size=int(enc["static_chunk_size"]),
    )
    estimator = EstimatorConfig(
        in_channels=int(est["in_channels"]),
        out_channels=int(est["out_channels"]),
        channels=tuple(int(c) for c in est["channels"]),
        attention_head_dim=int(est["attention_head_dim"]),
        n_blocks=int(est["n_blocks"]),
        num_mid_blocks=int(est["num_mid_blocks"]),
        num_heads=int(est["num_heads"]),
        act_fn=str(est["act_fn"]),
        static_chunk_size=int(est["static_chunk_size"]),
    )
    kwargs: dict[str, Any] = dict(
        input_size=int(flow["input_size"]),
        output_size=int(flow["output_size"]),
        spk_embed_dim=int(flow["spk_embed_dim"]),
        vocab_size=int(flow["vocab_size"]),
        token_mel_ratio=stride,
        pre_lookahead_len=int(flow["pre_lookahead_len"]),
        encoder=encoder,
        estimator=estimator,
        # PyYAML reads `1e-06` (no dot) as a string; float() accepts both.
        sigma_min=float(params.get("sigma_min", 1e-4)),
        t_scheduler=str(params.get("t_scheduler", "cosine")),
        training_cfg_rate=float(params.get("training_cfg_rate", 0.2)),
        inference_cfg_rate=float(params.get("inference_cfg_rate", 0.7)),
    )
    kwargs.update(overrides)
    return FlowConfig(**kwargs)


def config_to_yaml(cfg: FlowConfig, data_rate: int = 25) -> Tagged:
    """The `flow:` entry of cosyvoice2.yaml for this config (release class paths)."""
    enc, est = cfg.encoder, cfg.estimator
    if enc.num_up_blocks != 4:
        raise ValueError(f"the release format fixes 4 up_encoders; this config has {enc.num_up_blocks}")
    encoder = Tagged("new", "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder", {
        "output_size": enc.output_size, "attention_heads": enc.attention_heads, "linear_units": enc.linear_units,
        "num_blocks": enc.num_blocks, "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
        "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn", "input_size": enc.input_size, "use_cnn_module": False,
        "macaron_style": False, "static_chunk_size": enc.static_chunk_size,
    })
    estimator = Tagged("new", "cosyvoice.flow.decoder.CausalConditionalDecoder", {
        "in_channels": est.in_channels, "out_channels": est.out_channels, "channels": list(est.channels), "dropout": 0.0,
        "attention_head_dim": est.attention_head_dim, "n_blocks": est.n_blocks, "num_mid_blocks": est.num_mid_blocks,
        "num_heads": est.num_heads, "act_fn": est.act_fn, "static_chunk_size": est.static_chunk_size,
        "num_decoding_left_chunks": -1,
    })
    cfm_params = Tagged("new", "omegaconf.DictConfig", {"content": {
        "sigma_min": cfg.sigma_min, "solver": "euler", "t_scheduler": cfg.t_scheduler,
        "training_cfg_rate": cfg.training_cfg_rate, "inference_cfg_rate": cfg.inference_cfg_rate, "reg_loss_type": "l1",
    }})
    decoder = Tagged("new", "cosyvoice.flow.flow_matching.CausalConditionalCFM", {
        "in_channels": 3 * cfg.output_size, "n_spks": 1, "spk_emb_dim": cfg.output_size, "cfm_params": cfm_params,
        "estimator": estimator,
    })
    return Tagged("new", "cosyvoice.flow.flow.CausalMaskedDiffWithXvec", {
        "input_size": cfg.input_size, "output_size": cfg.output_size, "spk_embed_dim": cfg.spk_embed_dim,
        "output_type": "mel", "vocab_size": cfg.vocab_size, "input_frame_rate": data_rate, "only_mask_loss": True,
        "token_mel_ratio": cfg.token_mel_ratio, "pre_lookahead_len": cfg.pre_lookahead_len,
        "encoder": encoder, "decoder": decoder,
    })


def read_config(path: str | os.PathLike, **overrides: Any) -> FlowConfig:
    """FlowConfig from a release folder (or the cosyvoice2.yaml file itself)."""
    path = Path(path)
    yaml_file = path / YAML_NAME if path.is_dir() else path
    if not yaml_file.exists():
        raise CheckpointError(f"{path}: no {YAML_NAME}")
    try:
        data = load_cosyvoice_yaml(yaml_file)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{yaml_file}: {e}") from None
    return config_from_yaml(data, **overrides)


# ----------------------------------------------------------------------------- load / export


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[FlowConfig, TensorSource, str]:
    """A release folder's cosyvoice2.yaml (`flow:`) and flow.pt (or either file in it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_NAME
    return read_config(folder, **overrides), TorchSource(weights), str(weights)


def prepare_source(cfg: FlowConfig, source: TensorSource, what: str) -> tuple[FlowConfig, TensorSource, KeyTable]:
    return cfg, source, TABLE


def random_state_dict(cfg: FlowConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in flow.pt's layout (release key names and shapes), drawn on the
    host (no compile), for tests and benchmarks: matrices N(0, 1/fan_in), biases N(0, 0.1^2),
    norm scales 1 + N(0, 0.2^2), the token table N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in variable_paths(nnx.state(abstract_module(FlowDecoder, cfg))).items():
        key, transform = TABLE.to_theirs(path)
        shape, leaf = tuple(var.shape), path.rsplit(".", 1)[-1]
        noise = rng.standard_normal(shape, dtype=np.float32)
        if leaf == "scale":
            value = 1 + 0.2 * noise
        elif leaf in ("bias", "pos_bias_u", "pos_bias_v"):
            value = 0.1 * noise
        elif leaf == "embedding":
            value = noise
        else:
            value = noise / np.sqrt(np.prod(shape[:-1]))
        out[key] = np.ascontiguousarray(transform.to_theirs(value.astype(np.float32)))
    return out


# (config, FlowDecoder) from a release folder or a converted one: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


def export(model: FlowDecoder, cfg: FlowConfig, path: str | os.PathLike) -> Path:
    """Writes flow.pt (plain float tensors, release key names) and sets the `flow:` entry of
    cosyvoice2.yaml in ``path`` (other sections of an existing yaml are kept)."""
    path = Path(path)
    save_torch(torch_state_dict(dict(export_tensors(model, TABLE))), path / WEIGHTS_NAME)
    yaml_file = path / YAML_NAME
    data = load_cosyvoice_yaml(yaml_file) if yaml_file.exists() else {}
    data["flow"] = config_to_yaml(cfg)
    yaml_file.write_text(dump_cosyvoice_yaml(data))
    return path
