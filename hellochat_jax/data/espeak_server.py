"""espeak-ng in a small helper process that forks a fresh child for every utterance.

espeak-ng keeps state between utterances in C statics (the pitch-flutter phase, the double
buffer of harmonic spectra, ...), so the same call gives different samples depending on what was
spoken before, and there is no API to reset it. A child forked from a process that has
initialised espeak-ng but never spoken always starts from the same state, so each utterance
depends only on its own arguments. Forking this small process takes about a millisecond; forking
the caller (with TFDS, JAX, ... loaded) would take tens.

Run as `python -m hellochat_jax.data.espeak_server` (synth.Espeak does). Protocol: one JSON
request per line on stdin, a list of utterances ({"text", "voice", "rate", "pitch",
"pitch_range", "volume", "seed"}) that one child speaks in order; per utterance, on stdout, an
8-byte header (int32 status: 0 = ok, 1 = error; int32 length) and `length` bytes: int16 PCM at
22050 Hz, or a UTF-8 error message (which ends that request's answers). EOF on stdin ends the
server.
Only the standard library is imported, to keep the process small.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETERS = {"rate": 1, "volume": 2, "pitch": 3, "pitch_range": 4}
RATE = 22050


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _respond(fd: int, status: int, payload: bytes) -> None:
    _write_all(fd, struct.pack("<ii", status, len(payload)) + payload)


def _load():
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate != RATE:
        raise RuntimeError(f"espeak-ng failed to initialise (returned {rate})")
    # Load the English dictionary and phoneme tables once, here, instead of in every child.
    # Selecting a voice speaks nothing, so the state the children start from stays fixed.
    lib.espeak_SetVoiceByName(b"en")
    return lib


def _speak(lib, request: dict) -> bytes:
    chunks: list[bytes] = []

    def on_audio(wav, n, _events):
        if n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    callback = _CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(request["voice"].encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {request['voice']!r}")
    for name, code in _PARAMETERS.items():
        lib.espeak_SetParameter(code, int(request[name]), 0)
    lib.espeak_ng_SetRandSeed(int(request.get("seed", 0)))  # breath noise
    text = request["text"].encode("utf-8")
    err = lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed ({err}) for {request['text']!r}")
    lib.espeak_Synchronize()
    return b"".join(chunks)


def serve(stdin=sys.stdin.buffer, out_fd: int = 1) -> None:
    try:
        lib, load_error = _load(), None
    except Exception as e:  # answered to every request: the client shows it
        lib, load_error = None, f"{type(e).__name__}: {e}"
    for line in stdin:
        if not line.strip():
            continue
        if lib is None:
            _respond(out_fd, 1, load_error.encode())
            continue
        pid = os.fork()
        if pid == 0:  # the child speaks from the never-used state, answers and exits
            code = 0
            try:
                for request in json.loads(line):
                    _respond(out_fd, 0, _speak(lib, request))
            except Exception as e:
                _respond(out_fd, 1, f"{type(e).__name__}: {e}".encode())
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):  # died before answering
            _respond(out_fd, 1, f"espeak-ng crashed (signal {os.WTERMSIG(status)})".encode())


if __name__ == "__main__":
    serve()
