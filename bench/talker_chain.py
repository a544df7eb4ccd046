"""Where the talker loses intelligibility: the model folder's own recogniser (its thinker's ASR)
on held-out replies heard through more and more of the talker.

    truth      the corpus's recording (the floor)
    vocoder    its mel -> HiFT
    flow       its speech tokens (the corpus cache) -> flow -> HiFT
    talker     the reply text -> speech LM -> flow -> HiFT (what `hellochat eval tts` scores)

The flow and talker rows speak each reply in its corpus style, as `hellochat eval tts` does.

    python bench/talker_chain.py --model models/tiny [--num 40] [--markdown]
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import time

import jax
import numpy as np

from hellochat_jax.checkpoint.folder import load_model_folder
from hellochat_jax.components.hift.model import flow_mel_settings
from hellochat_jax.core import dsp
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.errors import UserError
from hellochat_jax.data import pipeline, speech_tokens
from hellochat_jax.pipelines import evaluate
from hellochat_jax.pipelines.chat import talker_from_folder
from hellochat_jax.pipelines.talker import flow_mel

LINKS = ("truth", "vocoder", "flow", "talker")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny")
    p.add_argument("--dataset", default="hellochat_synth")
    p.add_argument("--split", default="test")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--links", default=",".join(LINKS), help="which rows to measure (comma-separated)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    links = args.links.split(",")
    unknown = [name for name in links if name not in LINKS]
    if unknown:
        p.error(f"--links: unknown {', '.join(unknown)} (choose from {', '.join(LINKS)})")

    mesh = shd.make_mesh()
    bundle = load_model_folder(args.model, mesh)
    talker = talker_from_folder(bundle, mesh)
    thinker = evaluate.thinker_from_folder(bundle)
    sidecar = speech_tokens.load(args.dataset, args.split, args.data_dir)
    if sidecar is None:
        raise SystemExit(f"{args.dataset} {args.split} has no speech tokens: run `hellochat data tokens --model {args.model}` first")
    records = evaluate.speech_records(evaluate.load_records(args.dataset, args.split, args.num, args.data_dir))
    records = [r for r in records if r.example.id in sidecar and len(sidecar[r.example.id][1])]
    reply_tokens = [sidecar[r.example.id][1].tolist() for r in records]
    texts = [evaluate.reply_text(r.example.reply)[1] for r in records]
    truth = [r.example.reply_audio for r in records]
    styles = [evaluate.style_for_emotion(r.example.emotion) for r in records]
    rate = talker.sample_rate
    key = jax.random.key(0)

    def back(waves):
        return [dsp.resample(np.asarray(w, np.float32), rate, dsp.SAMPLE_RATE) for w in waves]

    def vocoder(batch):
        # true mels in the flow's settings: what a perfect flow would hand the vocoder
        mels = [flow_mel(dsp.resample(w, dsp.SAMPLE_RATE, rate), **flow_mel_settings(talker.hift.cfg)) for w in batch]
        t = max(m.shape[0] for m in mels)
        mel = np.stack([np.pad(m, ((0, t - m.shape[0]), (0, 0))) for m in mels])
        return back(talker.vocode(mel, np.asarray([m.shape[0] for m in mels]), key))

    def flow(rows):
        # the corpus's own speech tokens (its sidecar cache): what a perfect speech LM would say
        mel, mel_len = talker.tokens_to_mel([reply_tokens[i] for i in rows], None, talker._noise(key), styles=[styles[i] for i in rows])
        return back(talker.vocode(mel, mel_len, key))

    def batched(fn, items):
        return [wave for i in range(0, len(items), 8) for wave in fn(items[i : i + 8])]

    chain = {"truth": lambda: truth,
             "vocoder": lambda: batched(vocoder, truth),
             "flow": lambda: batched(flow, list(range(len(records)))),
             "talker": lambda: evaluate.synthesize(talker, texts, styles, batch_size=8, key=key)}
    asr = pipeline.INSTRUCTIONS["asr"][0]
    rows = []
    for name in links:
        make = chain[name]
        t0 = time.perf_counter()
        clips = make()
        hyps = evaluate.recognize(thinker.model, thinker.chat, clips, asr, system=thinker.system, batch_size=8, max_new_tokens=64, mesh=mesh)
        rows.append((name, evaluate.wer(texts, hyps), evaluate.cer(texts, hyps), time.perf_counter() - t0, hyps[0]))
    print(f"{len(records)} held-out replies of {args.split}; reference 0: {texts[0]!r}")
    if args.markdown:
        print("| heard through | WER | CER |\n|---|---|---|")
    for name, w, c, s, h in rows:
        print(f"| {name} | {w:.3f} | {c:.3f} |" if args.markdown else f"{name:8s} wer {w:.3f} cer {c:.3f} ({s:.0f} s)  0: {h!r}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a missing folder or dataset: one line, no traceback
        raise SystemExit(f"error: {e}") from None
