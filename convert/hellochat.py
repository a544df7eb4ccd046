"""`hellochat convert hellochat`: a MiDashengLM HF folder (the thinker) and a CosyVoice 2 release
(the talker) composed into one Hello-Chat model folder, which `hellochat chat` and `serve` run.

    hellochat convert hellochat --thinker /models/midashenglm-7b --talker /models/CosyVoice2-0.5B --out model/

The folder is `checkpoint/folder.py`'s (hellochat.json, one Orbax tree with the parts thinker,
talker, flow, hift, both tokenizers); the release's campplus.onnx and speech tokenizer are
copied as they are into voice/ for voice prompts (`--prompt-wav`).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from hellochat_jax.convert.cli import add_mesh_argument


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("hellochat", help="MiDashengLM HF folder + CosyVoice 2 release -> one Hello-Chat model folder")
    p.add_argument("--thinker", required=True, help="MiDashengLM HF folder (config.json, safetensors, tokenizer)")
    p.add_argument("--talker", default=None, help="CosyVoice 2 release folder (without it: a text-only model)")
    p.add_argument("--out", required=True, help="output model folder")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=_run)


def compose(thinker: str | Path, talker: str | Path | None, out: str | Path, mesh=None) -> Path:
    """Loads both releases onto `mesh` and writes the model folder `out`."""
    from flax import nnx

    from hellochat_jax.checkpoint.folder import save_model_folder
    from hellochat_jax.components.cosyvoice2 import weights as release
    from hellochat_jax.components.flow import weights as flow_weights
    from hellochat_jax.components.hellochat.model import HelloChat, HelloChatConfig
    from hellochat_jax.components.hift import weights as hift_weights
    from hellochat_jax.components.midashenglm import weights as thinker_weights
    from hellochat_jax.components.speech_lm import weights as llm_weights
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.pipelines.chat import VOICE_DIR

    mesh = mesh if mesh is not None else shd.make_mesh()
    thinker_cfg, thinker_model = thinker_weights.load(thinker, mesh, progress=True)
    parts = {"thinker": (thinker_cfg, thinker_model)}
    if talker is not None:
        talker = Path(talker)
        release.check_release(talker)
        parts["talker"] = llm_weights.load(talker, mesh, progress=True)
        parts["flow"] = flow_weights.load(talker, mesh, progress=True)
        parts["hift"] = hift_weights.load(talker, mesh, progress=True)
    cfg = HelloChatConfig(**{name: c for name, (c, _) in parts.items()})
    model = shd.abstract_model(lambda: HelloChat(cfg, rngs=nnx.Rngs(0)))
    for name, (_, module) in parts.items():
        setattr(model, name, module)
    out = Path(out)
    save_model_folder(model, out, thinker_tokenizer=thinker, talker_tokenizer=talker / release.QWEN_FOLDER if talker else None)
    if talker is not None:
        for name in ("campplus.onnx", release.S3_PT, release.S3_ONNX):
            if (talker / name).exists():
                (out / VOICE_DIR).mkdir(exist_ok=True)
                shutil.copy2(talker / name, out / VOICE_DIR / name)
    return out


def _run(args: argparse.Namespace) -> int:
    from hellochat_jax.core import sharding as shd

    start = time.perf_counter()
    out = compose(args.thinker, args.talker, args.out, shd.make_mesh(shd.parse_mesh_arg(args.mesh)))
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s){'' if args.talker else ' (no talker: text-only replies)'}")
    return 0
