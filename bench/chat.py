"""Chat latency: from the end of the user's audio to the first reply text and the first reply
audio, real-time factor, and where the time goes. Random weights, float32, CPU by default.

    python bench/chat.py                                  # tiny shapes, batch 1 and 8, cold and warm
    python bench/chat.py --shape release --batches 1      # Dasheng-base + Qwen2.5-7B widths + CosyVoice2-0.5B
    python bench/chat.py --shape release --thinker-layers 2 --talker-layers 24

Each measured call is `ChatPipeline.respond(..., stream=True)` on 2 s clips (the whole clip is
there when the call starts: "end of the user's audio" is the call's start). cold = the first
call in the process (compiles included; the persistent compilation cache is off), warm = the
best of --repeats later calls. RTF = wall time of the call / seconds of reply audio (all rows).
The breakdown comes from one extra warm call with every stage timed to completion
(block_until_ready), so its stages do not overlap; the latency numbers come from calls without it.
Release shapes: the thinker keeps Qwen2.5-7B's widths and vocabulary with --thinker-layers of
its 28 layers (memory); the per-token thinker time scales with layers, the table says how many.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_pipeline(max_new_tokens: int):
    import jax
    from transformers import AutoTokenizer

    from hellochat_jax.components.midashenglm import weights as thinker_weights
    from hellochat_jax.core import decoding
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.pipelines.chat import ChatPipeline
    from hellochat_jax.pipelines.talker import Talker
    from hellochat_jax.testing.midashenglm import make_tiny_midashenglm
    from hellochat_jax.testing.talker import make_tiny_release

    root = Path(tempfile.mkdtemp())
    make_tiny_midashenglm(root / "thinker")
    make_tiny_release(root / "talker", campplus=False, speech_tokenizer=False)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    _, thinker = thinker_weights.load(root / "thinker", mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "thinker"))
    talker = Talker.load(root / "talker", mesh)
    return ChatPipeline(thinker, tokenizer, talker, mesh=mesh, max_new_tokens=max_new_tokens, speech_sampling=decoding.Greedy(), speech_max_ratio=4.0)


def release_pipeline(args):
    import jax
    from flax import nnx
    from talker import release_talker
    from transformers import AutoTokenizer

    from hellochat_jax.components.dasheng.model import DashengConfig
    from hellochat_jax.components.midashenglm.model import (
        MiDashengLM,
        MiDashengLMConfig,
    )
    from hellochat_jax.components.qwen2.model import PRESETS, Qwen2Config
    from hellochat_jax.core import decoding
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.pipelines.chat import ChatPipeline
    from hellochat_jax.testing.midashenglm import write_tiny_tokenizer

    folder = Path(tempfile.mkdtemp()) / "tok"
    ids = write_tiny_tokenizer(folder)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    text = Qwen2Config(**{**PRESETS["qwen2.5-7b"], "num_hidden_layers": args.thinker_layers})
    cfg = MiDashengLMConfig(DashengConfig.preset("dasheng-base"), text, 5, ids["<|AUDIO|>"])
    thinker = shd.init_sharded(lambda: MiDashengLM(cfg, rngs=nnx.Rngs(0)), mesh)
    talker = release_talker(argparse.Namespace(layers=args.talker_layers))
    return ChatPipeline(thinker, AutoTokenizer.from_pretrained(str(folder)), talker, mesh=mesh, max_new_tokens=args.max_new_tokens,
                        speech_sampling=decoding.Greedy(), speech_max_ratio=4.0)


def conversations(batch: int, seconds: float):
    from hellochat_jax.pipelines.chat import Conversation

    rng = np.random.default_rng(0)
    return [Conversation().add_user(audio=(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)) for _ in range(batch)]


def timed_call(pipeline, convs) -> dict:
    import jax

    start = time.perf_counter()
    replies = pipeline.respond(convs, stream=True, key=jax.random.key(0))
    wall = time.perf_counter() - start
    audio = sum(len(r.waveform) for r in replies) / pipeline.talker.sample_rate
    firsts = [r.first_text_s for r in replies if r.first_text_s is not None]
    audios = [r.first_audio_s for r in replies if r.first_audio_s is not None]
    return {"wall": wall, "first_text": min(firsts) if firsts else float("nan"), "first_audio": min(audios) if audios else float("nan"),
            "rtf": wall / audio if audio else float("nan"), "audio_s": audio, "text_tokens": sum(len(r.thinker_tokens) for r in replies),
            "speech_tokens": sum(len(r.speech_tokens) for r in replies)}


class StageTimer:
    """Wraps the pipeline's stages so each call is timed to completion."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.count = collections.defaultdict(int)
        self.undo = []

    def wrap(self, owner, name: str, stage: str, count=lambda args, out: 1):
        import jax

        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(original(*args, **kwargs))
            self.total[stage] += time.perf_counter() - start
            self.count[stage] += count(args, out)
            return out

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self):
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)


def breakdown(pipeline, convs) -> dict:
    from hellochat_jax.components.hift import model as hift_lib
    from hellochat_jax.components.midashenglm import model as midashenglm
    from hellochat_jax.components.speech_lm import model as slm
    from hellochat_jax.core import decoding
    from hellochat_jax.pipelines import talker as talker_lib

    t = StageTimer()
    t.wrap(midashenglm, "prompt_embeddings", "encoder + adapter")
    t.wrap(decoding, "prefill", "thinker prefill")
    t.wrap(decoding, "decode", "thinker per text token")  # the chat loop decodes one token per call
    t.wrap(slm.BistreamDecoder, "push_text", "speech LM per token", count=lambda a, out: len(out))
    t.wrap(slm.BistreamDecoder, "finish", "speech LM per token", count=lambda a, out: len(out))
    t.wrap(talker_lib.Talker, "tokens_to_mel", "flow per chunk")
    t.wrap(hift_lib, "stream_step", "vocoder per chunk")
    try:
        timed_call(pipeline, convs)
    finally:
        t.restore()
    return {k: (t.total[k] / max(1, t.count[k]), t.count[k]) for k in t.total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "release"], default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=2.0, help="length of each user clip")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--thinker-layers", type=int, default=1, help="release shape: thinker layers (of 28)")
    p.add_argument("--talker-layers", type=int, default=24, help="release shape: speech LM layers (of 24)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    pipeline = tiny_pipeline(args.max_new_tokens) if args.shape == "tiny" else release_pipeline(args)
    rows = []
    for batch in args.batches:
        convs = conversations(batch, args.seconds)
        cold = timed_call(pipeline, convs)
        warm = min((timed_call(pipeline, convs) for _ in range(args.repeats)), key=lambda r: r["wall"])
        stages = breakdown(pipeline, convs)
        rows.append((batch, cold, warm, stages))
        print(f"batch {batch}: cold {cold}\n         warm {warm}", file=sys.stderr)

    shape = "tiny (testing makers)" if args.shape == "tiny" else f"release widths (thinker {args.thinker_layers}/28 layers, talker {args.talker_layers}/24)"
    print(f"\n### Chat latency, {shape}, {args.seconds:.0f} s clips, {args.max_new_tokens} reply tokens max, streaming\n")
    print("| batch | run | first text token | first audio chunk | RTF | reply audio | text / speech tokens |")
    print("|---|---|---|---|---|---|---|")
    for batch, cold, warm, _ in rows:
        for name, r in (("cold", cold), ("warm", warm)):
            print(f"| {batch} | {name} | {r['first_text']:.3f} s | {r['first_audio']:.3f} s | {r['rtf']:.2f} | {r['audio_s']:.1f} s | {r['text_tokens']} / {r['speech_tokens']} |")
    print("\n| batch | stage | mean per call | calls |")
    print("|---|---|---|---|")
    for batch, _, _, stages in rows:
        for stage, (mean, n) in stages.items():
            print(f"| {batch} | {stage} | {mean * 1e3:.1f} ms | {n} |")


if __name__ == "__main__":
    main()
