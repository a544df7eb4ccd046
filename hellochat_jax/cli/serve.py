"""`hellochat serve`: a local Gradio app for talking to a Hello-Chat model folder.

    hellochat serve --model model/ [--port 7860] [--host 127.0.0.1]

Speak into the microphone, upload a clip or type; the reply text streams into the chat as it is
decoded and the reply audio plays while it is being synthesised (chunk by chunk when ffmpeg is
installed, which Gradio needs to stream audio; otherwise the player is refreshed with the reply
so far at every chunk). Each browser session keeps its
own conversation (earlier audio turns stay audio). Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

DONE = object()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hellochat_jax.cli.chat import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")


def build_app(pipeline, *, title: str = "Hello-Chat"):
    """The Gradio Blocks app over a loaded ChatPipeline (one reply at a time). The components'
    elem_ids (chat, audio-in, text-in, send, reply-stream, reply-audio) are what the browser test
    (tests/test_serve_browser.py) finds them by."""
    import gradio as gr

    from hellochat_jax.core import dsp as audio_io
    from hellochat_jax.pipelines.chat import Conversation

    lock = threading.Lock()
    streaming = shutil.which("ffmpeg") is not None  # Gradio encodes streamed audio with ffmpeg
    rate = pipeline.talker.sample_rate if pipeline.talker is not None else None

    def respond(audio_path: str | None, text: str, history: list[dict[str, Any]], conversation: Conversation | None) -> Iterator[tuple]:
        conversation = conversation or Conversation()
        history = list(history or [])
        try:
            wav = audio_io.load(audio_path) if audio_path else None
            conversation.add_user(audio=wav, text=text or None)
        except ValueError as e:
            history.append({"role": "assistant", "content": f"error: {e}"})
            yield history, None, conversation, None
            return
        history.append({"role": "user", "content": (text or "") + (" [audio]" if audio_path else "")})
        history.append({"role": "assistant", "content": ""})
        events: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with lock:
                    result["reply"] = pipeline.respond([conversation], stream=True,
                                                       on_text=lambda i, piece: events.put(("text", piece)),
                                                       on_audio=lambda i, chunk: events.put(("audio", chunk)))[0]
            except Exception as e:  # noqa: BLE001 - shown in the chat; the server keeps running
                result["error"] = f"{type(e).__name__}: {e}"
            finally:
                events.put((DONE, None))

        threading.Thread(target=run, daemon=True).start()
        audio_parts: list[np.ndarray] = []
        while True:
            kind, value = events.get()
            if kind is DONE:
                break
            if kind == "text":
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + value}
                yield history, None, conversation, None
            else:
                audio_parts.append(value)
                # Without ffmpeg Gradio cannot stream audio: the player gets the reply so far.
                played = value if streaming else np.concatenate(audio_parts)
                yield history, (rate, _pcm16(played)), conversation, None
        reply = result.get("reply")
        if reply is None or reply.error:
            conversation.turns.pop()
            history[-1] = {"role": "assistant", "content": f"error: {result.get('error') or reply.error}"}
        else:
            conversation.add_assistant(reply.text, reply.style)
            notes = "".join(f"\n\n_({n})_" for n in reply.notes)
            history[-1] = {"role": "assistant", "content": reply.text + notes}
        full = (rate, _pcm16(np.concatenate(audio_parts))) if audio_parts else None
        yield history, None, conversation, full

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\n" + "".join(f"\n_{n}_" for n in pipeline.notes))
        chat = gr.Chatbot(label="conversation", elem_id="chat")
        state = gr.State(None)
        with gr.Row():
            audio_in = gr.Audio(sources=["microphone", "upload"], type="filepath", label="speak or upload", elem_id="audio-in")
            text_in = gr.Textbox(label="or type", lines=2, elem_id="text-in")
        send = gr.Button("send", variant="primary", elem_id="send")
        stream_out = gr.Audio(label="reply (as it is spoken)", streaming=streaming, autoplay=True, interactive=False, elem_id="reply-stream")
        full_out = gr.Audio(label="reply", interactive=False, elem_id="reply-audio")
        send.click(respond, [audio_in, text_in, chat, state], [chat, stream_out, state, full_out], api_name="respond")
    return app


def _pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)


def main(args: argparse.Namespace) -> int:
    from hellochat_jax.cli.chat import load_pipeline

    pipeline = load_pipeline(args)
    for note in pipeline.notes:
        print(f"note: {note}", file=sys.stderr)
    app = build_app(pipeline)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False)
    return 0
