"""Flow decoder speed at the CosyVoice2-0.5B release shapes, random weights, float32 (CPU by
default): ours vs the PyTorch reference (CosyVoice's CausalMaskedDiffWithXvec) on the same
weights, noise and tokens, in the same run.

    python bench/flow.py [--tokens 100] [--prompt-tokens 0] [--repeats 3] [--cosyvoice-src DIR]

Reports the matmul roofline of this machine (best f32 GFLOP/s of 2048^3 and 1024^3 XLA matmuls), the
estimator's achieved GFLOP/s (one CFG call, batch 2) and its fraction of that roofline, and the
whole flow's time and real-time factor (100 tokens = 4 s of speech, 10 Euler steps with CFG).
FLOPs are the matmul and convolution multiply-adds (x2) the computation needs, counted from the
config (`flow_flops`), the same count for ours and the reference.

The reference needs a CosyVoice checkout (--cosyvoice-src; its third_party/Matcha-TTS, or
--matcha-src) and diffusers, conformer and omegaconf importable (--ref-deps DIR adds a folder
to sys.path, e.g. one made with `pip install --no-deps --target DIR diffusers conformer
omegaconf antlr4-python3-runtime`). torchaudio, onnxruntime and lightning have no role in the
flow and are stubbed. Timed runs of ours and the reference alternate so both see the same
machine load; best of --repeats is reported.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import importlib.machinery
import json
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, matmul_peak_gflops  # noqa: E402

# The release's `flow:` section and the fixed parameters it references (FunAudioLLM/CosyVoice
# @ ace7c47, examples/libritts/cosyvoice2/conf/cosyvoice2.yaml; CosyVoice2-0.5B ships the same).
RELEASE_FLOW_YAML = """\
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: 2048
        num_blocks: 6
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [256]
            dropout: 0.0
            attention_head_dim: 64
            n_blocks: 4
            num_mid_blocks: 12
            num_heads: 8
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>
"""


def release_config(yaml_path: str | None):
    from hellochat_jax.components.flow import weights as cosyvoice2_flow

    if yaml_path is None:
        folder = Path(tempfile.mkdtemp())
        (folder / "cosyvoice2.yaml").write_text(RELEASE_FLOW_YAML)
        yaml_path = str(folder)
    return cosyvoice2_flow.read_config(yaml_path)


# ----------------------------------------------------------------------------- FLOP count


def estimator_flops(cfg, frames: int, rows: int) -> int:
    """Multiply-adds x 2 of one estimator call on `rows` sequences of `frames` mel frames."""
    est = cfg.estimator
    ch = tuple(est.channels)
    inner = est.num_heads * est.attention_head_dim

    def resnet(d_in, d_out, t):
        return 2 * t * (3 * d_in * d_out + 3 * d_out * d_out + d_in * d_out)

    def transformer(c, t):
        return 2 * t * (4 * c * inner + 8 * c * c) + 2 * 2 * t * t * inner

    total, t, d_in = 0, frames, est.in_channels
    for i, c in enumerate(ch):
        total += resnet(d_in, c, t) + est.n_blocks * transformer(c, t) + 2 * (t if i == len(ch) - 1 else (t + 1) // 2) * 3 * c * c
        d_in, t = c, (t if i == len(ch) - 1 else (t + 1) // 2)
    total += est.num_mid_blocks * (resnet(ch[-1], ch[-1], t) + est.n_blocks * transformer(ch[-1], t))
    up = ch[::-1] + (ch[0],)
    sizes = [frames]
    for i in range(len(ch) - 1):
        sizes.append((sizes[-1] + 1) // 2)
    for i in range(len(ch)):
        t = sizes[len(ch) - 1 - i]
        total += resnet(2 * up[i], up[i + 1], t) + est.n_blocks * transformer(up[i + 1], t) + 2 * t * (3 if i == len(ch) - 1 else 4) * up[i + 1] ** 2
    total += 2 * frames * (3 * up[-1] * up[-1] + up[-1] * est.out_channels)
    return rows * total


def encoder_flops(cfg, tokens: int, rows: int) -> int:
    """Multiply-adds x 2 of the conformer encoder and the projection to mu."""
    enc = cfg.encoder
    d, u, s = enc.output_size, enc.linear_units, enc.upsample_stride

    def layer(t):  # q, k, v, out; positions; content, position and value products; FFN
        return 2 * t * 4 * d * d + 2 * (2 * t - 1) * d * d + 2 * t * t * d + 2 * t * (2 * t - 1) * d + 2 * t * t * d + 4 * t * d * u

    t1, t2 = tokens, s * tokens
    total = 2 * t1 * d * d + 2 * t1 * (enc.pre_lookahead_len + 1 + 3) * d * d + enc.num_blocks * layer(t1)
    total += 2 * t2 * (2 * s + 1) * d * d + 2 * t2 * d * d + enc.num_up_blocks * layer(t2) + 2 * t2 * d * cfg.output_size
    return rows * total


def flow_flops(cfg, tokens: int, steps: int) -> int:
    """The whole inference: encoder once, the estimator `steps` times on the CFG batch of 2."""
    return encoder_flops(cfg, tokens, 1) + steps * estimator_flops(cfg, cfg.token_mel_ratio * tokens, 2)


# ----------------------------------------------------------------------------- the reference


def _stub(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def reference_flow(args, cfg, state_dict: dict[str, np.ndarray]):
    """CosyVoice's CausalMaskedDiffWithXvec with our weights, or (None, why)."""
    for path in (args.ref_deps, args.matcha_src, args.cosyvoice_src):
        if path:
            sys.path.insert(0, str(Path(path).absolute()))
    if args.cosyvoice_src and not args.matcha_src:
        sys.path.insert(0, str(Path(args.cosyvoice_src, "third_party", "Matcha-TTS").absolute()))
    # Imported by modules the flow pulls in, never called by it.
    for name in ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi", "onnxruntime"):
        sys.modules.get(name) or _stub(name)
    _stub("matcha.utils", __path__=[])  # its __init__ pulls in hydra / lightning / rich for training tools
    _stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)
    try:
        import torch
        from cosyvoice.flow.decoder import CausalConditionalDecoder
        from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
        from cosyvoice.flow.flow_matching import CausalConditionalCFM
        from cosyvoice.transformer.upsample_encoder import (
            PreLookaheadLayer,
            Upsample1D,
            UpsampleConformerEncoder,
        )
        from omegaconf import DictConfig
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return None, f"reference not importable ({type(e).__name__}: {e}); see --cosyvoice-src / --ref-deps"
    enc, est = cfg.encoder, cfg.estimator
    encoder = UpsampleConformerEncoder(
        input_size=enc.input_size, output_size=enc.output_size, attention_heads=enc.attention_heads,
        linear_units=enc.linear_units, num_blocks=enc.num_blocks, input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", use_cnn_module=False,
        macaron_style=False, normalize_before=True, static_chunk_size=enc.static_chunk_size,
    )
    # the reference hard-codes 512 channels here (the release width)
    encoder.pre_lookahead_layer = PreLookaheadLayer(enc.output_size, enc.output_size, enc.pre_lookahead_len)
    encoder.up_layer = Upsample1D(enc.output_size, enc.output_size, enc.upsample_stride)
    estimator = CausalConditionalDecoder(
        in_channels=est.in_channels, out_channels=est.out_channels, channels=list(est.channels), dropout=0.0,
        attention_head_dim=est.attention_head_dim, n_blocks=est.n_blocks, num_mid_blocks=est.num_mid_blocks,
        num_heads=est.num_heads, act_fn=est.act_fn, static_chunk_size=est.static_chunk_size, num_decoding_left_chunks=-1,
    )
    params = DictConfig({"sigma_min": cfg.sigma_min, "solver": "euler", "t_scheduler": cfg.t_scheduler,
                         "training_cfg_rate": cfg.training_cfg_rate, "inference_cfg_rate": cfg.inference_cfg_rate, "reg_loss_type": "l1"})
    decoder = CausalConditionalCFM(in_channels=3 * cfg.output_size, cfm_params=params, n_spks=1, spk_emb_dim=cfg.output_size, estimator=estimator)
    flow = CausalMaskedDiffWithXvec(
        input_size=cfg.input_size, output_size=cfg.output_size, spk_embed_dim=cfg.spk_embed_dim, vocab_size=cfg.vocab_size,
        input_frame_rate=25, token_mel_ratio=cfg.token_mel_ratio, pre_lookahead_len=cfg.pre_lookahead_len, encoder=encoder, decoder=decoder,
    )
    flow.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    return flow.eval(), None


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100, help="speech tokens to synthesise (25 per second)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="voice-prompt tokens in front (their mel is the condition)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses the machine's cores)")
    p.add_argument("--cosyvoice-src", default=os.environ.get("COSYVOICE_SRC"), help="CosyVoice checkout for the reference")
    p.add_argument("--matcha-src", default=None, help="Matcha-TTS checkout (default: the CosyVoice checkout's third_party/Matcha-TTS)")
    p.add_argument("--ref-deps", default=os.environ.get("COSYVOICE_DEPS"), help="folder with diffusers / conformer / omegaconf")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--yaml", default=None, help="a release folder or cosyvoice2.yaml to take the flow sizes from")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hellochat_jax.checkpoint.io import DictSource
    from hellochat_jax.checkpoint.load import load_from_source
    from hellochat_jax.components.flow import weights as cosyvoice2_flow
    from hellochat_jax.components.flow.model import jit_inference
    from hellochat_jax.core import sharding as shd

    cfg = release_config(args.yaml)
    steps = cfg.n_timesteps
    n_tok, n_prompt = args.tokens, args.prompt_tokens
    frames = cfg.token_mel_ratio * (n_tok + n_prompt)
    speech_s = cfg.token_mel_ratio * n_tok / 50.0
    peak = matmul_peak_gflops()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; f32 matmul roofline (2048^3, XLA): {peak:.1f} GFLOP/s")

    state_dict = cosyvoice2_flow.random_state_dict(cfg, seed=0)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    _, model = load_from_source(cosyvoice2_flow.COMPONENT, cfg, DictSource(state_dict), mesh)
    rng = np.random.default_rng(0)
    inputs = {
        "token": rng.integers(0, cfg.vocab_size, (1, n_tok)).astype(np.int32),
        "token_len": np.array([n_tok], np.int32),
        "prompt_token": rng.integers(0, cfg.vocab_size, (1, n_prompt)).astype(np.int32),
        "prompt_token_len": np.array([n_prompt], np.int32),
        "prompt_feat": rng.normal(-6, 2, (1, 2 * n_prompt, cfg.output_size)).astype(np.float32),
        "prompt_feat_len": np.array([2 * n_prompt], np.int32),
        "embedding": rng.normal(size=(1, cfg.spk_embed_dim)).astype(np.float32),
    }
    noise = rng.standard_normal((1, frames, cfg.output_size), dtype=np.float32)

    infer = jit_inference(model)

    def ours_flow(model, inputs, noise):
        mel, _ = infer(**inputs, noise=noise)
        return mel

    # jax.jit on the split state: nnx.jit would re-walk the module graph on every call
    est_graph, est_state = nnx.split(model.estimator)
    estimator_call = jax.jit(lambda state, *a: nnx.merge(est_graph, state)(*a))

    def ours_estimator(estimator, *args):
        return estimator_call(est_state, *args)

    est_args = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in ((2, frames, 80), (2, frames), (2, frames, 80), (2,), (2, 80), (2, frames, 80))]
    est_args[1] = jnp.ones((2, frames), jnp.float32)
    mel = np.asarray(ours_flow(model, inputs, noise))
    ours_estimator(model.estimator, *est_args).block_until_ready()

    ref, why = (None, "skipped (--skip-reference)") if args.skip_reference else reference_flow(args, cfg, state_dict)
    ref_mel = None
    if ref is not None:
        import torch

        torch.set_num_threads(args.threads)
        ref.decoder.rand_noise = torch.from_numpy(noise.transpose(0, 2, 1).copy())
        t_in = {k: torch.from_numpy(v) for k, v in inputs.items()}

        def reference():
            with torch.inference_mode():
                out, _ = ref.inference(**t_in, streaming=False, finalize=True)
            return out

        ref_mel = reference().numpy().transpose(0, 2, 1)

    t_ours, t_est, t_ref = [], [], []
    for _ in range(args.repeats):
        t_ours.append(best_time(lambda: ours_flow(model, inputs, noise).block_until_ready(), 1))
        t_est.append(best_time(lambda: ours_estimator(model.estimator, *est_args).block_until_ready(), 2))
        if ref is not None:
            t_ref.append(best_time(reference, 1))
        # the roofline is re-measured between runs and the best kept, so that on a shared
        # machine it is not taken from a busier moment than the runs it is compared with
        peak = max(peak, matmul_peak_gflops(repeats=3), matmul_peak_gflops(1024, repeats=10))

    est_gflop = estimator_flops(cfg, frames, 2) / 1e9
    flow_gflop = flow_flops(cfg, n_tok + n_prompt, steps) / 1e9
    row = {
        "tokens": n_tok, "prompt_tokens": n_prompt, "mel_frames": frames, "speech_s": speech_s, "steps": steps,
        "matmul_peak_gflops": peak,
        "estimator_call_s": min(t_est), "estimator_gflop": est_gflop,
        "estimator_gflops": est_gflop / min(t_est), "estimator_fraction_of_peak": est_gflop / min(t_est) / peak,
        "flow_s": min(t_ours), "flow_gflop": flow_gflop, "flow_gflops": flow_gflop / min(t_ours),
        "flow_rtf": min(t_ours) / speech_s, "flow_fraction_of_peak": flow_gflop / min(t_ours) / peak,
    }
    print(f"estimator (CFG batch 2 x {frames} frames): {min(t_est) * 1e3:.0f} ms, {row['estimator_gflops']:.1f} GFLOP/s "
          f"= {row['estimator_fraction_of_peak']:.0%} of the roofline (best measured: {peak:.1f} GFLOP/s)")
    print(f"flow ({n_tok} tokens = {speech_s:.1f} s" + (f" after {n_prompt} prompt tokens" if n_prompt else "")
          + f", {steps} steps, CFG): ours {min(t_ours):.2f} s, RTF {row['flow_rtf']:.3f}, {row['flow_gflops']:.1f} GFLOP/s "
          f"= {row['flow_gflops'] / peak:.0%} of the roofline")
    if t_ref:
        row.update(reference_s=min(t_ref), reference_rtf=min(t_ref) / speech_s, reference_gflops=flow_gflop / min(t_ref),
                   speedup=min(t_ref) / min(t_ours), max_abs_diff_vs_reference=float(np.abs(mel - ref_mel).max()))
        print(f"reference (PyTorch {__import__('torch').__version__}, {args.threads} threads): {min(t_ref):.2f} s, "
              f"RTF {row['reference_rtf']:.3f}, {row['reference_gflops']:.1f} GFLOP/s; ours x{row['speedup']:.2f}; "
              f"max |mel diff| {row['max_abs_diff_vs_reference']:.2e}")
    else:
        row["reference"] = why
        print(f"reference: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
