"""`hellochat speak`: text to speech with the talker (CosyVoice 2 in JAX).

    hellochat speak --talker talker/ --text "Hello there." --out reply.wav
    hellochat speak --talker talker/ --text "One." --text "Two." --out reply.wav      # reply_0.wav, reply_1.wav
    hellochat speak --talker talker/ --text "..." --prompt-wav voice.wav --prompt-text "what voice.wav says" --out reply.wav
    hellochat speak --talker talker/ --text "..." --out reply.wav --stream          # written chunk by chunk

--talker is a folder converted with `hellochat convert cosyvoice2`, or the release folder itself
(converted in memory at every start). Several --text values are spoken in one batch. With
--stream each chunk is appended to the WAV file as soon as it is ready (one text at a time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--talker", "--model", dest="talker", required=True,
                   help="model folder with a talker, converted talker folder, or CosyVoice 2 release folder")
    p.add_argument("--text", required=True, action="append", help="text to speak (repeat for a batch)")
    p.add_argument("--prompt-wav", default=None, help="voice prompt audio (any rate; 0.5-30 s of speech)")
    p.add_argument("--prompt-text", default=None, help="transcript of the voice prompt")
    p.add_argument("--out", required=True, help="output WAV (with several texts: OUT_0.wav, OUT_1.wav, ...)")
    p.add_argument("--instruct", default=None, metavar="TEXT",
                   help="how to speak (CosyVoice 2 instruct, e.g. 'calm'): the speech LM's prompt text; a flow that "
                        "lists styles (model.flow.style_speakers) also hears it as its speaker")
    p.add_argument("--stream", action="store_true", help="write audio chunk by chunk as speech tokens arrive")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--greedy", action="store_true", help="argmax speech tokens instead of repetition-aware sampling")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--mesh", default=None, help="e.g. data=1,tensor=2 (default: all devices on data)")


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    suffix = path.suffix or ".wav"
    return [path.with_name(f"{path.stem}_{i}{suffix}") for i in range(n)]


def main(args: argparse.Namespace) -> int:
    import jax
    import soundfile as sf

    from hellochat_jax.checkpoint.io import CheckpointError
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.core.decoding import Greedy
    from hellochat_jax.pipelines.talker import Talker, TalkerError

    if bool(args.prompt_wav) != bool(args.prompt_text):
        print("error: --prompt-wav and --prompt-text go together (the prompt's audio and its transcript)", file=sys.stderr)
        return 2
    if args.stream and len(args.text) > 1:
        print("error: --stream speaks one --text at a time", file=sys.stderr)
        return 2
    try:
        mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
        start = time.perf_counter()
        talker = Talker.load(args.talker, mesh, dtype=args.dtype, progress=True)
        print(f"loaded talker from {args.talker} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        sampling = Greedy() if args.greedy else None  # None: the checkpoint's own (CosyVoice 2's RAS)
        key = jax.random.key(args.seed)
        prompt = talker.make_prompt(args.prompt_wav, args.prompt_text) if args.prompt_wav else None
        paths = output_paths(args.out, len(args.text))
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.stream:
            total = 0
            with sf.SoundFile(str(paths[0]), "w", samplerate=talker.sample_rate, channels=1, subtype="PCM_16") as f:
                for i, chunk in enumerate(talker.speak_stream(args.text[0], prompt, key=key, sampling=sampling, instruction=args.instruct)):
                    f.write(chunk)
                    f.flush()
                    total += len(chunk)
                    print(f"chunk {i}: {len(chunk) / talker.sample_rate:.2f} s of audio at {time.perf_counter() - start:.2f} s", file=sys.stderr)
            print(f"wrote {paths[0]} ({total / talker.sample_rate:.2f} s of audio)")
        else:
            instructions = [args.instruct] * len(args.text) if args.instruct else None
            waves = talker.speak(args.text, prompt, key=key, sampling=sampling, instructions=instructions)
            for path, wav in zip(paths, waves):
                sf.write(str(path), wav, talker.sample_rate, subtype="PCM_16")
                print(f"wrote {path} ({len(wav) / talker.sample_rate:.2f} s of audio)")
            print(f"synthesis took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    except (TalkerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
