"""`hellochat chat`: speech in, speech out with a Hello-Chat model folder.

    hellochat chat --model model/ --audio q.wav --out-dir replies/ --stream
    hellochat chat --model model/ --audio q1.wav --audio q2.wav --out-dir replies/        # one batch
    hellochat chat --model model/ --text "How are you?" --out-dir replies/
    hellochat chat --model model/ --audio q.wav --conversation talk/ --out-dir replies/   # multi-turn

Every --audio and every --text is one conversation; all of them are answered in one batch.
Each reply goes to OUT_DIR/<name>.txt (text, style tag stripped) and OUT_DIR/<name>.wav
(24 kHz; with --stream appended chunk by chunk as the audio is ready). <name> is the audio
file's stem, or text_<k>. With a single conversation the reply text is printed as it is
decoded; with several, each reply is printed when done. --conversation DIR keeps the turns (the
user's audio as WAV, the replies as text) in DIR, so the next call answers in context; it takes
one --audio and/or one --text (one turn). A conversation that cannot be answered (bad audio,
too long for the thinker) is reported and the others are still answered (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--audio", action="append", default=[], help="a spoken turn (any format soundfile reads; repeat for a batch)")
    p.add_argument("--text", action="append", default=[], help="a typed turn (repeat for a batch)")
    p.add_argument("--out-dir", required=True, help="where <name>.wav and <name>.txt go")
    p.add_argument("--stream", action="store_true", help="write the reply audio chunk by chunk while the reply is generated")
    p.add_argument("--conversation", default=None, help="folder that keeps a multi-turn conversation (created if missing)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, voice and decoding options (shared with `serve`)."""
    p.add_argument("--model", required=True, help="model folder (hellochat convert hellochat, hellochat export)")
    p.add_argument("--system", default=None, help="system message (default: the model folder's, else MiDashengLM's)")
    p.add_argument("--prompt-wav", default=None, help="voice prompt audio (0.5-30 s of speech)")
    p.add_argument("--prompt-text", default=None, help="transcript of the voice prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="thinker sampling; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--no-compilation-cache", action="store_true", help="do not use the persistent compilation cache (~/.cache/hellochat/jax)")


def load_pipeline(args: argparse.Namespace):
    """The ChatPipeline of --model with the sampling, system and voice options of `args`."""
    from hellochat_jax.core import decoding
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.core.compile_cache import enable_compilation_cache
    from hellochat_jax.pipelines.chat import ChatPipeline

    if not args.no_compilation_cache:
        enable_compilation_cache()
    if bool(args.prompt_wav) != bool(args.prompt_text):
        raise SystemExit("error: --prompt-wav and --prompt-text go together (the prompt's audio and its transcript)")
    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    options = {"max_new_tokens": args.max_new_tokens,
               "sampling": decoding.sampling_method(args.temperature, args.top_k, args.top_p, args.repetition_penalty)}
    if args.system is not None:
        options["system"] = args.system
    pipeline = ChatPipeline.load(args.model, mesh, **options)
    if args.prompt_wav:
        if pipeline.talker is None:
            raise SystemExit("error: --prompt-wav: this model has no talker to speak in that voice")
        pipeline.voice = pipeline.talker.make_prompt(args.prompt_wav, args.prompt_text)
    return pipeline


def main(args: argparse.Namespace) -> int:
    import jax
    import soundfile as sf

    from hellochat_jax.core import dsp as audio_io
    from hellochat_jax.pipelines.chat import Conversation

    if not args.audio and not args.text:
        raise SystemExit("error: give at least one --audio or --text")
    if args.conversation and (len(args.audio) > 1 or len(args.text) > 1):
        raise SystemExit("error: --conversation takes one turn: at most one --audio and one --text")
    out_dir = Path(args.out_dir)
    failed = 0
    # Conversations first: a bad file or folder is reported before the model loads.
    names, conversations = [], []
    if args.conversation:
        conv = Conversation.load(args.conversation)
        conv.add_user(audio=audio_io.load(args.audio[0]) if args.audio else None, text=args.text[0] if args.text else None)
        names.append(Path(args.audio[0]).stem if args.audio else "text_0")
        conversations.append(conv)
    else:
        for path in args.audio:
            try:
                conversations.append(Conversation().add_user(audio=audio_io.load(path)))
                names.append(Path(path).stem)
            except audio_io.AudioError as e:
                print(f"error: {e}", file=sys.stderr)  # names the file; the others are still answered
                failed += 1
        for k, text in enumerate(args.text):
            conversations.append(Conversation().add_user(text=text))
            names.append(f"text_{k}")
    if not conversations:
        return 1
    names = _unique(names)
    pipeline = load_pipeline(args)
    for note in pipeline.notes:
        print(f"note: {note}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = pipeline.talker.sample_rate if pipeline.talker is not None else None
    writers: dict[int, sf.SoundFile] = {}
    single = len(conversations) == 1

    def on_text(i: int, piece: str) -> None:
        if single:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def on_audio(i: int, chunk) -> None:
        if i not in writers:
            writers[i] = sf.SoundFile(str(out_dir / f"{names[i]}.wav"), "w", samplerate=rate, channels=1, subtype="PCM_16")
        writers[i].write(chunk)
        writers[i].flush()  # a player reading the file sees each chunk as it lands

    try:
        replies = pipeline.respond(conversations, stream=args.stream, key=jax.random.key(args.seed), on_text=on_text, on_audio=on_audio)
    finally:
        for w in writers.values():
            w.close()
    if single:
        print()
    for i, (name, reply) in enumerate(zip(names, replies)):
        if reply.error:
            print(f"error: {name}: {reply.error}", file=sys.stderr)
            failed += 1
            continue
        (out_dir / f"{name}.txt").write_text(reply.text + "\n")
        if not single:
            print(f"{name}: {reply.text}")
        for note in reply.notes:
            print(f"note: {name}: {note}", file=sys.stderr)
        where = f"{out_dir / name}.txt" + (f" + .wav ({len(reply.waveform) / rate:.2f} s)" if i in writers else "")
        style = f" [style: {reply.style}]" if reply.style else ""
        print(f"wrote {where}{style}", file=sys.stderr)
        if args.conversation:
            conversations[i].add_assistant(reply.text, reply.style).save(args.conversation)
    return 1 if failed else 0


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return out
