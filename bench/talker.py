"""Talker speed at the CosyVoice2-0.5B release shapes, random weights, float32 (CPU by default).

    python bench/talker.py                      # everything
    python bench/talker.py --only lm --layers 4 # quicker: the speech LM with 4 decoder layers
    python bench/talker.py --cosyvoice-src DIR  # a CosyVoice checkout for the PyTorch reference

Measures
  * speech LM (Qwen2.5-0.5B backbone, speech vocabulary 6561 + 3): decode tokens/s at batch 1
    and 8 (ras sampling, fixed length: min = max length rule, the extra stop tokens disabled);
    the PyTorch reference (CosyVoice's Qwen2LM.inference on transformers, the same weights)
    at batch 1, the only batch size its decoder supports;
  * flow real-time factor (100 tokens = 4 s of speech, 10 Euler steps with CFG) and HiFT
    real-time factor (ours; bench/hift.py compares the vocoder with the reference);
  * streaming: time to the first audio chunk of `Talker.speak_stream` at batch 1 (after a
    warm-up run, i.e. compiled), and the whole talker's real-time factor without streaming.
The reference needs torchaudio, which has no build here: it is stubbed (the LM never calls it).
Timed runs of ours and the reference alternate so both see the same machine load; best of
--repeats is reported.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from common import best_time


def streamed_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all parameters but the text embedding table
    (a step gathers one row of it). At batch 1 decoding is bound by this over memory bandwidth."""
    import jax
    from flax import nnx

    total = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    table = model.llm.embed_tokens.embedding
    return total - int(table.size) * table.dtype.itemsize


def stub_torchaudio() -> None:
    """CosyVoice imports torchaudio at module level; the speech LM does not use it."""
    if "torchaudio" in sys.modules:
        return
    import importlib.machinery

    def module(name):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return m

    ta = module("torchaudio")
    ta.compliance = module("torchaudio.compliance")
    ta.compliance.kaldi = module("torchaudio.compliance.kaldi")
    sys.modules.update({"torchaudio": ta, "torchaudio.compliance": ta.compliance, "torchaudio.compliance.kaldi": ta.compliance.kaldi})


def reference_lm(src: str | None, cfg, state_dict):
    """CosyVoice's Qwen2LM on transformers' Qwen2ForCausalLM with our weights, or (None, why)."""
    if src:
        sys.path.insert(0, str(Path(src).absolute()))
    stub_torchaudio()
    try:
        import functools

        import torch
        from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM
        from cosyvoice.utils.common import ras_sampling
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return None, f"reference not importable ({type(e).__name__}: {e}); pass --cosyvoice-src DIR (a CosyVoice checkout)"
    encoder = Qwen2Encoder.__new__(Qwen2Encoder)
    torch.nn.Module.__init__(encoder)
    encoder.model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.qwen2.to_hf().items() if k != "torch_dtype"}))
    s = cfg.sampling  # RepetitionAware(Nucleus(...)): CosyVoice 2's ras_sampling
    ref = Qwen2LM(cfg.hidden_size, cfg.hidden_size, cfg.speech_token_size, encoder,
                  functools.partial(ras_sampling, top_p=s.inner.top_p, top_k=s.inner.top_k, win_size=s.window, tau_r=s.tau_r))
    ref.load_state_dict(state_dict, strict=True)
    return ref.eval(), None


def bench_lm(args, results: dict) -> None:
    import jax
    import torch
    from flax import nnx

    from hellochat_jax.components.qwen2.model import PRESETS, Qwen2Config
    from hellochat_jax.components.speech_lm import model as slm
    from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm
    from hellochat_jax.core import sharding as shd

    qwen = Qwen2Config(**{**PRESETS["qwen2.5-0.5b"], "num_hidden_layers": args.layers})
    cfg = slm.SpeechTokenLMConfig(qwen2=qwen, speech_token_size=6561)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    model = shd.init_sharded(lambda: slm.SpeechTokenLM(cfg, rngs=nnx.Rngs(0)), mesh)
    bias = np.array(model.llm_decoder.bias[...])
    bias[cfg.speech_token_size + 1 :] = -1e4  # S+1 and fill never stop the run early
    model.llm_decoder.bias.set_value(jax.numpy.asarray(bias))
    rng = np.random.default_rng(0)
    text = rng.integers(0, 1000, args.text_tokens).tolist()
    n_tokens = args.text_tokens * args.ratio  # min = max length: exactly this many tokens
    row = {"layers": args.layers, "tokens_per_row": n_tokens}

    def ours(batch: int):
        dec = slm.SpeechDecoder.start(model, [text] * batch, min_ratio=args.ratio, max_ratio=args.ratio, key=jax.random.key(1))
        dec.advance()
        toks, lens = dec.result()
        assert (lens == n_tokens).all(), lens

    for b in (1, 8):
        ours(b)  # compile
    ref, why = (None, "skipped (--skip-reference)") if args.skip_reference else reference_lm(args.cosyvoice_src, cfg, cosyvoice2_llm.export_state_dict(model, cfg))

    def reference():
        with torch.inference_mode():
            out = list(ref.inference(
                text=torch.tensor([text], dtype=torch.int32), text_len=torch.tensor([len(text)], dtype=torch.int32),
                prompt_text=torch.zeros(1, 0, dtype=torch.int32), prompt_text_len=torch.tensor([0], dtype=torch.int32),
                prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32), prompt_speech_token_len=torch.tensor([0], dtype=torch.int32),
                embedding=torch.zeros(0, 192), min_token_text_ratio=args.ratio, max_token_text_ratio=args.ratio,
            ))
        assert len(out) == n_tokens, len(out)

    if ref is not None:
        try:
            reference()
        except Exception as e:  # noqa: BLE001
            ref, why = None, f"reference decode failed under transformers {__import__('transformers').__version__}: {type(e).__name__}: {e}"
    t1, t8, tr = [], [], []
    for _ in range(args.repeats):
        t1.append(best_time(lambda: ours(1), 1))
        t8.append(best_time(lambda: ours(8), 1))
        if ref is not None:
            tr.append(best_time(reference, 1))
    row["ours_b1_tok_s"] = n_tokens / min(t1)
    row["weights_gb_per_step"] = streamed_weight_bytes(model) / 1e9
    row["ours_b1_weight_gb_s"] = row["weights_gb_per_step"] * row["ours_b1_tok_s"]
    row["ours_b8_tok_s"] = 8 * n_tokens / min(t8)
    if tr:
        row["reference_b1_tok_s"] = n_tokens / min(tr)
        row["speedup_b1"] = row["ours_b1_tok_s"] / row["reference_b1_tok_s"]
    else:
        row["reference"] = why
    results["speech_lm"] = row
    print(f"speech LM decode reads {row['weights_gb_per_step']:.2f} GB of weights per step: {row['ours_b1_weight_gb_s']:.1f} GB/s at batch 1")
    print(f"speech LM ({args.layers} layers, {n_tokens} tokens/row): ours {row['ours_b1_tok_s']:.1f} tok/s (batch 1), "
          f"{row['ours_b8_tok_s']:.1f} tok/s (batch 8)" + (f"; reference {row['reference_b1_tok_s']:.1f} tok/s (batch 1), x{row['speedup_b1']:.2f}" if tr else f"; reference: {why}"))


def release_talker(args):
    """A Talker at release shapes with random weights (tokenizer: the tiny byte-level one)."""
    import jax
    from flax import nnx

    from hellochat_jax.components.flow.model import FlowConfig, FlowDecoder
    from hellochat_jax.components.hift.model import HiFTConfig, HiFTVocoder
    from hellochat_jax.components.qwen2.model import PRESETS, Qwen2Config
    from hellochat_jax.components.speech_lm import model as slm
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.pipelines.talker import Talker, load_tokenizer
    from hellochat_jax.testing.talker import make_tiny_tokenizer

    mesh = shd.make_mesh(devices=jax.devices()[:1])
    cfg = slm.SpeechTokenLMConfig(qwen2=Qwen2Config(**{**PRESETS["qwen2.5-0.5b"], "num_hidden_layers": args.layers}), speech_token_size=6561)
    llm = shd.init_sharded(lambda: slm.SpeechTokenLM(cfg, rngs=nnx.Rngs(0)), mesh)
    bias = np.array(llm.llm_decoder.bias[...])
    bias[cfg.speech_token_size :] = -1e4  # random weights: no stop before max length
    llm.llm_decoder.bias.set_value(jax.numpy.asarray(bias))
    flow = shd.init_sharded(lambda: FlowDecoder(FlowConfig(), rngs=nnx.Rngs(1)), mesh)
    hift = shd.init_sharded(lambda: HiFTVocoder(HiFTConfig(), rngs=nnx.Rngs(2)), mesh)
    if hasattr(hift, "fold_weight_norm"):
        hift = hift.fold_weight_norm()
    folder = Path(tempfile.mkdtemp()) / "tok"
    make_tiny_tokenizer(folder)
    return Talker(llm, flow, hift, load_tokenizer(folder), mesh=mesh, missing={"s3tokenizer": "bench", "campplus": "bench"})


def bench_talker(args, results: dict) -> None:
    import jax
    import jax.numpy as jnp

    from hellochat_jax.components.hift.model import synthesize

    talker = release_talker(args)
    seconds = 4.0
    tokens = [list(np.random.default_rng(0).integers(0, 6561, 100))]
    noise = talker._noise(jax.random.key(0))  # the fixed-size noise buffer

    def flow():
        mel, _ = talker.tokens_to_mel(tokens, None, noise)
        return mel

    mel = flow()
    t_flow = best_time(flow, args.repeats)
    mel_t = jnp.asarray(mel.transpose(0, 2, 1))

    def hift():
        wav, _ = synthesize(talker.hift, mel_t, key=jax.random.key(0))
        wav.block_until_ready()

    hift()
    t_hift = best_time(hift, args.repeats)
    results["flow"] = {"seconds": t_flow, "rtf": t_flow / seconds, "audio_s": seconds}
    results["hift"] = {"seconds": t_hift, "rtf": t_hift / seconds, "audio_s": seconds}
    print(f"flow (100 tokens = 4 s, 10 steps, CFG): {t_flow:.2f} s, RTF {t_flow / seconds:.3f}")
    print(f"HiFT (200 frames = 4 s): {t_hift:.2f} s, RTF {t_hift / seconds:.3f}")

    text = "Hello, how are you today?"  # 25 byte tokens; max 500 speech tokens

    def first_chunk():
        t = time.perf_counter()
        stream = talker.speak_stream(text, key=jax.random.key(3))
        chunk = next(stream)
        elapsed = time.perf_counter() - t
        stream.close()
        return elapsed, len(chunk)

    first_chunk()  # compile
    lat = min(first_chunk()[0] for _ in range(args.repeats))
    results["stream_first_chunk_s"] = lat
    print(f"streaming first chunk (batch 1, compiled): {lat:.2f} s")

    short = "Hello there."  # 12 tokens -> 240 speech tokens max (all of them: no eos here)

    def whole():
        [wav] = talker.speak(short, key=jax.random.key(4))
        return len(wav) / talker.sample_rate

    audio = whole()
    t_all = best_time(whole, max(1, args.repeats // 2))
    results["talker_rtf"] = {"seconds": t_all, "audio_s": audio, "rtf": t_all / audio}
    print(f"whole talker, no streaming ({audio:.1f} s of speech): {t_all:.2f} s, RTF {t_all / audio:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["lm", "talker"], default=None)
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the speech LM (release: 24)")
    p.add_argument("--text-tokens", type=int, default=10)
    p.add_argument("--ratio", type=int, default=10, help="speech tokens per text token (fixed length)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    p.add_argument("--cosyvoice-src", default=os.environ.get("COSYVOICE_SRC"))
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import jax
    import torch

    torch.set_num_threads(args.threads)
    results: dict = {"device": str(jax.devices()[0].platform), "threads": args.threads}
    if args.only in (None, "lm"):
        bench_lm(args, results)
    if args.only in (None, "talker"):
        bench_talker(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
