"""The embedded speech corpus, made offline: espeak-ng (through ctypes, in a helper process:
see espeak_server.py) speaks template texts with emotion prosody, procedural background sounds
are mixed in at random SNRs, and every utterance gets a caption.

Everything is a pure function of (seed, split, index), so a corpus is reproducible and the
records of a split can be made in any order by any number of processes.

espeak-ng's library and voice data come from the `espeakng-loader` wheel; nothing is downloaded.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
import threading
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050  # espeak-ng's native output rate

SPLITS = ("train", "validation", "test")
EMOTIONS = ("neutral", "happy", "sad", "angry")
# "silence" is the label of a clip with no background event.
EVENTS = ("beep", "siren", "knock", "noise_burst", "music", "rain", "silence")
KINDS = ("question", "statement", "request", "dialogue")

ACCENTS = {
    "en-us": "an American",
    "en": "a British",
    "en-gb-x-rp": "a southern British",
    "en-gb-scotland": "a Scottish",
    "en-029": "a Caribbean",
    "en-us-nyc": "a New York",
}
VARIANTS = {
    **{f"m{i}": "man" for i in range(1, 8)},
    **{f"f{i}": "woman" for i in range(1, 6)},
}
# Replies (talker training targets) are always spoken by this voice, in the style below.
REPLY_VOICE = "en-us+f2"

MAX_SPEECH_SECONDS = 3.6  # speech part of an utterance; the clip adds 0.1-0.3 s either side


@dataclasses.dataclass(frozen=True)
class Prosody:
    """espeak-ng parameters: rate in words/minute, pitch and pitch range 0-100, volume 0-200."""

    rate: int
    pitch: int
    pitch_range: int
    volume: int


# Emotions are realised through prosody only: espeak has no emotional voices.
EMOTION_PROSODY = {
    "neutral": Prosody(rate=165, pitch=50, pitch_range=45, volume=100),
    "happy": Prosody(rate=190, pitch=72, pitch_range=90, volume=125),
    "sad": Prosody(rate=125, pitch=30, pitch_range=12, volume=65),
    "angry": Prosody(rate=205, pitch=58, pitch_range=75, volume=175),
}


# How the assistant answers each emotion it hears (Hello-Chat's point: calm to an angry
# speaker, gentle to a sad one, cheerful back to a happy one). The thinker learns to write the
# style before its reply (<style>calm</style>...), the talker to speak it from CosyVoice 2's
# instruction text, and the reply audio of the corpus is spoken in it.
STYLE_FOR_EMOTION = {"neutral": "neutral", "happy": "cheerful", "sad": "gentle", "angry": "calm"}
STYLE_PROSODY = {
    "neutral": EMOTION_PROSODY["neutral"],
    "cheerful": EMOTION_PROSODY["happy"],
    "gentle": EMOTION_PROSODY["sad"],
    "calm": Prosody(rate=150, pitch=46, pitch_range=35, volume=85),
}
# The emotion class each style's prosody realises: what an emotion recogniser trained on this
# corpus should hear in speech of that style (style accuracy is measured against it).
STYLE_EMOTION = {"neutral": "neutral", "cheerful": "happy", "gentle": "sad", "calm": "neutral"}


def jitter_prosody(p: Prosody, rng: np.random.Generator, amount: float = 0.1) -> Prosody:
    """Varies a preset by up to +-amount so that emotions overlap a little, like real voices."""

    def j(v: int, lo: int, hi: int) -> int:
        return int(np.clip(round(v * (1 + rng.uniform(-amount, amount))), lo, hi))

    return Prosody(j(p.rate, 80, 400), j(p.pitch, 0, 99), j(p.pitch_range, 0, 99), j(p.volume, 10, 200))


# --------------------------------------------------------------------------- espeak-ng

class EspeakError(RuntimeError):
    pass


class Espeak:
    """Client of espeak_server: each utterance is spoken by a fresh fork of a process that has
    initialised espeak-ng and never spoken, so the samples depend only on the arguments (espeak-ng
    otherwise carries state from one utterance to the next). One server per client process."""

    def __init__(self):
        self._owner = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hellochat_jax.data.espeak_server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )  # fmt: skip
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self._proc.stdout.read(n - len(data))
            if not chunk:
                raise EspeakError(f"the espeak-ng helper process exited (code {self._proc.poll()})")
            data += chunk
        return bytes(data)

    def synth(self, utterances: list[tuple[str, str, Prosody]], seed: int = 0) -> list[np.ndarray]:
        """Speaks [(text, voice, prosody)], in order, from the fixed start state -> int16 PCM
        at 22050 Hz each. `seed` seeds espeak-ng's breath noise."""
        requests = [
            {"text": text, "voice": voice, "seed": int(seed), **dataclasses.asdict(prosody)}
            for text, voice, prosody in utterances
        ]
        out = []
        with self._lock:
            try:
                self._proc.stdin.write((json.dumps(requests) + "\n").encode())
            except BrokenPipeError as e:
                raise EspeakError(f"the espeak-ng helper process exited (code {self._proc.poll()})") from e
            for _ in requests:
                status, length = struct.unpack("<ii", self._read(8))
                payload = self._read(length)
                if status != 0:
                    raise EspeakError(payload.decode("utf-8", "replace"))
                out.append(np.frombuffer(payload, np.int16).copy())
        return out

    def close(self) -> None:
        if os.getpid() == self._owner and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)


_ESPEAK: Espeak | None = None


def espeak() -> Espeak:
    """This process's espeak-ng (a forked child must not share its parent's helper)."""
    global _ESPEAK
    if _ESPEAK is None or _ESPEAK._owner != os.getpid():
        _ESPEAK = Espeak()
    return _ESPEAK


@functools.cache
def _resample_filter() -> np.ndarray:
    from scipy import signal

    # resample_poly's own default design for 22050 -> 16000 (= 320/441), made once: designing
    # it on every call took a fifth of the corpus build time.
    return signal.firwin(2 * 10 * 441 + 1, 1.0 / 441, window=("kaiser", 5.0)).astype(np.float32)


def _to_16k(pcm: np.ndarray) -> np.ndarray:
    """int16 at 22050 Hz -> float32 at 16 kHz, leading/trailing silence trimmed."""
    from scipy import signal

    wav = signal.resample_poly(pcm.astype(np.float32) / 32768.0, 320, 441, window=_resample_filter())
    wav = wav.astype(np.float32)
    loud = np.flatnonzero(np.abs(wav) > 1e-3)
    return wav[loud[0] : loud[-1] + 1] if loud.size else wav


def speak_many(utterances: list[tuple[str, str, Prosody]], seed: int = 0) -> list[np.ndarray]:
    """[(text, voice, prosody)] -> speech for each as float32 at 16 kHz. The result is a
    function of the arguments alone (one fresh espeak-ng state per call)."""
    return [_to_16k(pcm) for pcm in espeak().synth(utterances, seed)]


def speak(text: str, voice: str, prosody: Prosody, seed: int = 0) -> np.ndarray:
    return speak_many([(text, voice, prosody)], seed)[0]


# --------------------------------------------------------------------------- texts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a speaker says (`text`), the assistant's answer (`reply`) and, for dialogues, the
    earlier turns (`context`: (role, text) pairs, starting with the user). Prompts with the
    same `group` (default: the text) always land in the same split."""

    kind: str
    text: str
    reply: str
    context: tuple[tuple[str, str], ...] = ()
    group: str = ""


_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_NUMBERS += "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
_COLORS = {
    "sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black",
    "banana": "yellow", "tomato": "red", "carrot": "orange", "lemon": "yellow", "cloud": "white",
    "leaf": "green", "strawberry": "red", "night sky": "dark", "pumpkin": "orange",
}  # fmt: skip
_LEGS = {
    "dog": 4, "cat": 4, "bird": 2, "spider": 8, "horse": 4, "duck": 2, "ant": 6, "cow": 4,
    "chicken": 2, "beetle": 6, "frog": 4, "snake": 0, "fish": 0, "bee": 6, "goat": 4,
}  # fmt: skip
_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
    "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana", "Poland": "Warsaw",
    "Austria": "Vienna", "Portugal": "Lisbon", "Germany": "Berlin", "Sweden": "Stockholm",
}  # fmt: skip
_OPPOSITES = {
    "hot": "cold", "up": "down", "early": "late", "big": "small", "fast": "slow", "happy": "sad",
    "open": "closed", "light": "dark", "full": "empty", "loud": "quiet", "old": "new",
    "wet": "dry", "high": "low", "soft": "hard", "near": "far", "thick": "thin",
}  # fmt: skip
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()
_PLACES = "park, market, library, beach, station, museum, bakery, gym, office, garden, river, zoo".split(", ")
_TIMES = "this morning, last night, yesterday, today, on Sunday, after lunch, before work".split(", ")
_PAST = {
    "went to": "How was the {p}?", "walked to": "Was it a nice walk to the {p}?",
    "cycled to": "Cycling is great. Was the {p} busy?", "drove to": "Was there much traffic to the {p}?",
}  # fmt: skip
_FEELINGS = {
    "I finally finished my project": "Congratulations, that is a great achievement.",
    "I lost my keys again": "I am sorry. Did you check your coat pockets?",
    "My team won the game": "Well done, that must feel wonderful.",
    "I missed the last bus": "That is frustrating. Can you get a taxi?",
    "The cake turned out perfect": "Lovely, baking is so satisfying.",
    "It has rained all week": "That sounds gloomy. Hopefully the sun returns soon.",
    "I got a new puppy": "How exciting. What is its name?",
    "My phone screen cracked": "Oh no. A repair shop can often fix it quickly.",
    "The concert was amazing": "I am glad you enjoyed it.",
    "I could not sleep last night": "I am sorry. A short walk might help you rest.",
}
_DEVICES = "lights, heater, fan, radio, television, oven, kettle, music".split(", ")
_ROOMS = "kitchen, bedroom, living room, hallway, office, bathroom".split(", ")
_ACTIONS = {"turn on": "turning on", "turn off": "turning off", "check": "checking"}
_TASKS = "call my sister, buy milk, water the plants, feed the cat, send the email, take my pills".split(", ")
_CLOCK = "six, seven, eight, nine, ten, noon".split(", ")
_TRIPS = {
    "What should I pack for {c}?": "Pack comfortable shoes and a light jacket for {c}.",
    "What should I see in {c}?": "The old town of {c} is worth a long walk.",
    "How long should I stay in {c}?": "Three or four days in {c} is a good start.",
    "Is {c} expensive?": "Prices in {c} are moderate if you plan ahead.",
}
_FOODS = "pasta, soup, curry, pancakes, salad, rice".split(", ")


def all_prompts() -> list[Prompt]:
    """Every text the corpus can speak, in a fixed order."""
    out: list[Prompt] = []
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for (name, op), a, b in itertools.product(ops.items(), range(13), range(13)):
        r = op(a, b)
        if 0 <= r <= 20:
            out.append(Prompt("question", f"What is {_NUMBERS[a]} {name} {_NUMBERS[b]}?",
                              f"{_NUMBERS[a].capitalize()} {name} {_NUMBERS[b]} is {_NUMBERS[r]}."))  # fmt: skip
    for thing, color in _COLORS.items():
        out.append(Prompt("question", f"What color is the {thing}?", f"The {thing} is {color}."))
    for animal, n in _LEGS.items():
        out.append(Prompt("question", f"How many legs does a {animal} have?", f"A {animal} has {_NUMBERS[n]} legs."))
    for country, city in _CAPITALS.items():
        out.append(Prompt("question", f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for i, day in enumerate(_DAYS):
        out.append(Prompt("question", f"What day comes after {day}?", f"After {day} comes {_DAYS[(i + 1) % 7]}."))
    for i, month in enumerate(_MONTHS):
        out.append(Prompt("question", f"Which month follows {month}?", f"{_MONTHS[(i + 1) % 12]} follows {month}."))
    for word, opposite in _OPPOSITES.items():
        out.append(Prompt("question", f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for (verb, reply), place, when in itertools.product(_PAST.items(), _PLACES, _TIMES):
        out.append(Prompt("statement", f"I {verb} the {place} {when}.", reply.format(p=place)))
    for (feeling, reply), when in itertools.product(_FEELINGS.items(), ("", " today", " again")):
        out.append(Prompt("statement", f"{feeling}{when}.", reply))
    for (action, doing), device, room in itertools.product(_ACTIONS.items(), _DEVICES, _ROOMS):
        out.append(Prompt("request", f"Please {action} the {device} in the {room}.",
                          f"Okay, {doing} the {device} in the {room}."))  # fmt: skip
    for n in range(1, 21):
        minutes = _NUMBERS[n]
        out.append(Prompt("request", f"Set a timer for {minutes} minutes.", f"A {minutes} minute timer is running."))
    for task, clock in itertools.product(_TASKS, _CLOCK):
        at = "at noon" if clock == "noon" else f"at {clock}"
        out.append(Prompt("request", f"Remind me to {task} {at}.", f"I will remind you to {task} {at}."))
    # Dialogues about one city (or dish) share a group, so no split sees another's turns.
    for (question, reply), city, day in itertools.product(_TRIPS.items(), _CAPITALS.values(), _DAYS[:5]):
        context = (("user", f"I am visiting {city} on {day}."), ("assistant", "How exciting. How can I help?"))
        out.append(Prompt("dialogue", question.format(c=city), reply.format(c=city), context, group=city))
    for food in _FOODS:
        context = (("user", f"I am cooking {food} tonight."), ("assistant", "Sounds tasty. Anything I can do?"))
        for action in ("turn on", "turn off"):
            out.append(Prompt("dialogue", f"Please {action} the oven for the {food}.",
                              f"Sure, I will {action} the oven for your {food}.", context, group=food))  # fmt: skip
        out.append(Prompt("dialogue", f"How long should the {food} cook?",
                          f"About twenty minutes is usually enough for {food}.", context, group=food))  # fmt: skip
    return out


def split_of(prompt: Prompt) -> str:
    """Train/validation/test by a stable hash of the prompt's group, so the three splits never
    share a text (spoken or in a dialogue's context), whatever the corpus size or seed."""
    key = (prompt.group or prompt.text).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def prompts_for(split: str) -> list[Prompt]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return [p for p in all_prompts() if split_of(p) == split]


DRILL_KIND = "drill"


@functools.cache
def _drill_vocabulary() -> tuple[str, ...]:
    """Every word of the training split's prompts, replies and dialogue turns, lower case unless
    it is only ever written capitalised (names, days, "I")."""
    words: dict[str, str] = {}
    for p in prompts_for("train"):
        for text in [p.text, p.reply] + [t for _, t in p.context]:
            for w in text.replace(",", " ").replace(".", " ").replace("?", " ").split():
                if w.lower() not in words or w.islower():
                    words[w.lower()] = w
    return tuple(words[k] for k in sorted(words))


@functools.cache
def _held_out_texts() -> frozenset[str]:
    return frozenset(t.lower().rstrip(".?") for s in SPLITS[1:] for p in prompts_for(s) for t in (p.text, p.reply))


def drill_prompt(seed: int, index: int) -> Prompt:
    """A training-only word drill: random words of the training vocabulary said by the speaker,
    and other random words as the "reply". A template corpus of ~1100 sentences lets a model
    recognise the sentence instead of its words (held-out transcripts came out as training
    sentences 56 times in 60): words in no order can only be heard. The reply is no answer, so
    a drill never teaches the qa task (`pipeline.available_tasks`); it gives the reply voice,
    and the talker trained on it, words in new orders too. Off by default: 1000 drills did not
    stop the tiny thinker from answering with training sentences (README, thinker ablation);
    the CTC on its adapter rows did."""
    rng = np.random.default_rng([seed, 7, index])
    vocab = _drill_vocabulary()

    def sentence() -> str:
        while True:
            words = [vocab[int(i)] for i in rng.integers(len(vocab), size=int(rng.integers(3, 9)))]
            text = " ".join(words)
            if text.lower() not in _held_out_texts():  # never a held-out sentence by chance
                return text[0].upper() + text[1:] + "."

    return Prompt(DRILL_KIND, sentence(), sentence())


# --------------------------------------------------------------------------- background events


def _fade(x: np.ndarray, ms: float = 5.0) -> np.ndarray:
    n = min(len(x) // 2, int(SAMPLE_RATE * ms / 1000))
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _tone(freq: float, seconds: float, harmonics: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = sum(np.sin(2 * np.pi * freq * (h + 1) * t) / (h + 1) for h in range(harmonics))
    return _fade(np.asarray(x, np.float32))


def make_event(name: str, rng: np.random.Generator, max_samples: int) -> np.ndarray:
    """One procedurally generated sound event (float32, 16 kHz, peak ~1)."""
    from scipy import signal

    sr = SAMPLE_RATE
    if name == "beep":
        freq, dur, gap = rng.uniform(500, 2000), rng.uniform(0.08, 0.25), rng.uniform(0.05, 0.2)
        beep = _tone(freq, dur)
        parts = [np.concatenate([beep, np.zeros(int(gap * sr), np.float32)])] * int(rng.integers(1, 4))
        x = np.concatenate(parts)
    elif name == "siren":
        dur = rng.uniform(0.8, 2.0)
        t = np.arange(int(dur * sr)) / sr
        lo, hi, rate = rng.uniform(500, 800), rng.uniform(1000, 1600), rng.uniform(0.5, 2.0)
        freq = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * rate * t))
        x = _fade(np.sin(2 * np.pi * np.cumsum(freq) / sr).astype(np.float32), 20)
    elif name == "knock":
        n_knocks, spacing = int(rng.integers(2, 6)), rng.uniform(0.12, 0.3)
        hit_len = int(0.06 * sr)
        env = np.exp(-np.arange(hit_len) / (0.008 * sr))
        b, a = signal.butter(2, rng.uniform(150, 500) / (sr / 2))
        hit = signal.lfilter(b, a, rng.standard_normal(hit_len)) * env
        x = np.zeros(int(spacing * sr * n_knocks) + hit_len, np.float32)
        for k in range(n_knocks):
            start = int(k * spacing * sr)
            x[start : start + hit_len] += hit
    elif name == "noise_burst":
        x = _fade(rng.standard_normal(int(rng.uniform(0.1, 0.4) * sr)).astype(np.float32), 10)
    elif name == "music":
        scale = 261.63 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
        if rng.random() < 0.5:  # a chord
            root = int(rng.integers(0, 4))
            x = sum(_tone(scale[root + k], 1.0, harmonics=3) for k in (0, 2, 4))
        else:  # a melody
            notes = rng.integers(0, len(scale), size=int(rng.integers(3, 7)))
            x = np.concatenate([_tone(scale[n], rng.uniform(0.15, 0.3), harmonics=3) for n in notes])
    elif name == "rain":
        dur = rng.uniform(1.5, 4.0)
        b, a = signal.butter(2, [1000 / (sr / 2), 6000 / (sr / 2)], btype="band")
        x = 0.3 * signal.lfilter(b, a, rng.standard_normal(int(dur * sr)))
        drops = rng.integers(0, len(x), size=int(dur * 40))
        x[drops] += rng.uniform(-1, 1, size=drops.size)
        x = _fade(x.astype(np.float32), 50)
    elif name == "silence":
        x = np.zeros(0, np.float32)
    else:
        raise ValueError(f"unknown event {name!r}; use one of {EVENTS}")
    x = np.asarray(x, np.float32)[:max_samples]
    peak = np.abs(x).max() if x.size else 0.0
    return x / peak if peak > 0 else x


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def mix_events(speech: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Adds 0-2 background events at random offsets; each at a random SNR in [0, 20] dB (speech
    RMS over the RMS of the event's audible samples). Returns the mix and [(event, snr_db)]."""
    n_events = int(rng.choice(3, p=[0.3, 0.5, 0.2]))
    names = rng.choice(len(EVENTS) - 1, size=n_events, replace=False)  # excludes "silence"
    out, placed = speech.copy(), []
    speech_rms = _rms(speech) or 1e-3
    for i in sorted(names):
        placed.append((EVENTS[i], _place_event(out, EVENTS[i], speech_rms, rng)))
    return _unclipped(out), placed


def add_event(clip: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """`clip` with one more background event, made afresh and placed as `mix_events` places
    them (the clip's RMS stands for the speech's: its events are 0-20 dB below it)."""
    out = np.asarray(clip, np.float32).copy()
    _place_event(out, name, _rms(out) or 1e-3, rng)
    return _unclipped(out)


def _place_event(out: np.ndarray, name: str, speech_rms: float, rng: np.random.Generator) -> float:
    """Adds one new `name` event into `out` in place, at a random offset and SNR; returns the SNR."""
    event = make_event(name, rng, len(out))
    snr_db = float(rng.uniform(0.0, 20.0))
    # The level while the event sounds (gaps between knocks or beeps do not count).
    level = _rms(event[np.abs(event) > 1e-3])
    if level > 0:  # an event cut to nothing by a very short clip adds nothing
        event *= speech_rms / (level * 10 ** (snr_db / 20))
    start = int(rng.integers(0, len(out) - len(event) + 1))
    out[start : start + len(event)] += event
    return snr_db


def _unclipped(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max() if x.size else 0.0
    if peak > 0.99:  # keep int16 storage from clipping; relative levels are unchanged
        x *= 0.99 / peak
    return x


# --------------------------------------------------------------------------- captions

_EVENT_PHRASES = {
    "beep": "electronic beeping",
    "siren": "a wailing siren",
    "knock": "knocking",
    "noise_burst": "a sudden burst of noise",
    "music": "a few musical notes",
    "rain": "rain",
}
_EMOTION_WORDS = {"neutral": "calm and neutral", "happy": "happy", "sad": "sad", "angry": "angry"}


def describe_voice(voice: str) -> str:
    lang, variant = voice.split("+")
    accent = ACCENTS[lang]
    return f"{accent[0].upper()}{accent[1:]} {VARIANTS[variant]}"


def caption(voice: str, emotion: str, prosody: Prosody, events: list[tuple[str, float]]) -> str:
    pace = "slowly" if prosody.rate < 150 else "quickly" if prosody.rate > 185 else "at an even pace"
    loud = " and softly" if prosody.volume < 85 else " and loudly" if prosody.volume > 145 else ""
    pitch = "low" if prosody.pitch < 40 else "high" if prosody.pitch > 62 else "medium-pitched"
    shape = "flat" if prosody.pitch_range < 30 else "lively" if prosody.pitch_range > 70 else "steady"
    feeling = _EMOTION_WORDS[emotion]
    text = f"{describe_voice(voice)} speaks {pace}{loud} in a {pitch}, {shape} voice, sounding {feeling}."
    if not events:
        return text + " The background is quiet."
    phrases = []
    for name, snr in events:
        level = "faint " if snr >= 13 else "loud " if snr < 5 else ""
        phrases.append(level + _EVENT_PHRASES[name])
    return text + " In the background: " + " and ".join(phrases) + "."


# --------------------------------------------------------------------------- utterances


def voices() -> list[str]:
    return [f"{lang}+{variant}" for lang in ACCENTS for variant in VARIANTS]


def _speak_fitting(utterances: list[tuple[str, str, Prosody]], max_samples: list[int], seed: int) -> list[np.ndarray]:
    """Speaks, then speaks faster whatever overran its limit (a slow sad voice can overrun a
    long sentence), up to three times; then cuts."""
    wavs = speak_many(utterances, seed)
    for _ in range(3):
        over = [i for i, w in enumerate(wavs) if len(w) > max_samples[i]]
        if not over:
            break
        faster = []
        for i in over:
            text, voice, p = utterances[i]
            utterances[i] = (text, voice, dataclasses.replace(p, rate=int(p.rate * 1.25)))
            faster.append(utterances[i])
        for i, wav in zip(over, speak_many(faster, seed)):
            wavs[i] = wav
    return [w[:m] for w, m in zip(wavs, max_samples)]


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def make_utterance(prompt: Prompt, seed: int, split: str, index: int) -> dict[str, Any]:
    """One corpus record (the TFDS feature dict of `builders.FEATURES`)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    all_voices = voices()
    voice = all_voices[int(rng.integers(len(all_voices)))]
    emotion = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
    prosody = jitter_prosody(EMOTION_PROSODY[emotion], rng)

    espeak_seed = int(rng.integers(2**31))
    limit = int(MAX_SPEECH_SECONDS * SAMPLE_RATE)
    # One request: the utterance, the reply in the fixed voice, earlier user turns in this voice.
    context_users = [i for i, (role, _) in enumerate(prompt.context) if role == "user"]
    style = STYLE_FOR_EMOTION[emotion]
    utterances = [(prompt.text, voice, prosody), (prompt.reply, REPLY_VOICE, STYLE_PROSODY[style])]
    utterances += [(prompt.context[i][1], voice, prosody) for i in context_users]
    wavs = _speak_fitting(utterances, [limit, 2 * limit] + [limit] * len(context_users), espeak_seed)
    speech, reply_audio = wavs[0], wavs[1]
    prosody = utterances[0][2]  # as spoken: _speak_fitting may have sped it up
    context_audio = [np.zeros(0, np.float32) for _ in prompt.context]
    for i, wav in zip(context_users, wavs[2:]):
        context_audio[i] = wav
    context_lengths = [len(w) for w in context_audio]

    pad = [np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE), np.float32) for _ in range(2)]
    clip, events = mix_events(np.concatenate([pad[0], speech, pad[1]]), rng)
    labels = sorted({name for name, _ in events}) or ["silence"]

    return {
        "id": f"synth-{split}-{index:07d}",
        "audio": to_int16(clip),
        "transcript": prompt.text,
        "emotion": emotion,
        "events": ",".join(labels),
        "caption": caption(voice, emotion, prosody, events),
        "voice": voice,
        "kind": prompt.kind,
        "reply": prompt.reply,
        "reply_audio": to_int16(reply_audio),
        "context": json.dumps([{"role": r, "text": t} for r, t in prompt.context]),
        "context_audio": to_int16(np.concatenate(context_audio)) if context_audio else np.zeros(0, np.int16),
        "context_audio_lengths": np.asarray(context_lengths, np.int32),
        "speech_tokens": np.zeros(0, np.int32),
        "reply_speech_tokens": np.zeros(0, np.int32),
    }


def corpus_texts(split: str = "train") -> list[str]:
    """Texts for training the tokenizer: everything a sample of this split can contain
    (captions depend on the random draws, so their vocabulary is enumerated here)."""
    texts = []
    for p in prompts_for(split):
        texts += [p.text, p.reply] + [t for _, t in p.context]
    for voice in voices():
        for emotion, prosody in EMOTION_PROSODY.items():
            texts.append(caption(voice, emotion, prosody, [(e, 10.0) for e in EVENTS[:-1]]))
    texts += list(EMOTIONS) + [", ".join(EVENTS)] + [f"faint {p}" for p in _EVENT_PHRASES.values()]
    return texts
