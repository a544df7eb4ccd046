"""`hellochat eval`: held-out metrics of a model folder on a corpus split, Seed-TTS-Eval style
(what each metric means: hellochat_jax/pipelines/evaluate.py).

    hellochat eval understand --model model/ [--split test] [--num 100] [--json out.json]
        the thinker: wer, cer, emotion_accuracy, events_f1, reply_word_accuracy,
        reply_word_accuracy_facts (and reply_style_accuracy when the corpus maps emotions to styles)
    hellochat eval tts --model model/ [--recognizer other_model/] [--json out.json]
        the talker, heard by a recogniser thinker (default: the folder's own): tts_wer, tts_cer,
        tts_wer_floor (the corpus's recordings), tts_wer_noise (white noise), style_accuracy
        (and style_accuracy_floor, the same on the corpus's recordings)

Metrics print one `name value` per line; --json writes them with the number of records used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    u = sub.add_parser("understand", help="the thinker: ASR, emotion, events and replies")
    t = sub.add_parser("tts", help="the talker: WER of its speech as a recogniser hears it")
    t.add_argument("--recognizer", default=None, help="model folder whose thinker transcribes (default: --model's)")
    t.add_argument("--seed", type=int, default=0, help="the talker's sampling and noise")
    t.add_argument("--speech-max-ratio", type=float, default=20.0, help="most speech tokens per text token (CosyVoice 2: 20)")
    for p in (u, t):
        p.add_argument("--model", required=True, help="model folder (hellochat export / convert hellochat)")
        p.add_argument("--dataset", default="hellochat_synth", help="\"name[/config]\" under the data dir, or a built dataset folder")
        p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
        p.add_argument("--split", default="test")
        p.add_argument("--num", type=int, default=100, help="the first NUM records of the split (0 = all)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=64, help="longest thinker answer (transcript, label, reply)")
        p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
        p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
        p.add_argument("--no-compilation-cache", action="store_true", help="do not use the persistent compilation cache (~/.cache/hellochat/jax)")


def main(args: argparse.Namespace) -> int:
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.core.compile_cache import enable_compilation_cache
    from hellochat_jax.pipelines import evaluate

    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num < 0:
        raise SystemExit("error: --batch-size and --max-new-tokens must be at least 1, --num at least 0")
    if not args.no_compilation_cache:
        enable_compilation_cache()
    options = {"dataset": args.dataset, "split": args.split, "num": args.num or None, "data_dir": args.data_dir,
               "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "mesh": shd.make_mesh(shd.parse_mesh_arg(args.mesh)), "progress": True}
    if args.eval_command == "understand":
        metrics, details = evaluate.understand_folder(args.model, **options)
    else:
        metrics, details = evaluate.tts_folder(args.model, recognizer=args.recognizer, seed=args.seed,
                                             speech_max_ratio=args.speech_max_ratio, **options)
    for name, value in metrics.items():
        print(f"{name} {value:.4f}")
    if args.json:
        report = {"model": str(args.model), "dataset": args.dataset, "split": args.split, "metrics": metrics, **details}
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0
