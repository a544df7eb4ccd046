"""The talker: text -> 25 Hz speech tokens -> 50 Hz mel -> 24 kHz speech (CosyVoice 2).

    talker = Talker.load("talker/")          # converted folder, or a release folder as is
    [wav] = talker.speak(["Hello there."], key=jax.random.key(0))
    for chunk in talker.speak_stream("Hello there.", key=jax.random.key(0)): ...

Parts: SpeechTokenLM (llm), FlowDecoder (flow), HiFTVocoder (hift), the CosyVoice-BlankEN
tokenizer (transformers.AutoTokenizer plus the 19 special tokens CosyVoice 2 adds), and for
voice prompts S3Tokenizer v2 and the release's campplus.onnx (onnxruntime).

Zero-shot voice (`prompt_wav` + `prompt_text`), as CosyVoice 2's frontend does: the prompt's
S3 tokens (16 kHz) prefix both the LM and the flow, its 80-bin mel (24 kHz, matcha's
mel_spectrogram) is the flow's prompt condition, trimmed together with the tokens to 2 frames
per token, and its x-vector comes from campplus.onnx on Kaldi fbank features
(kaldi_native_fbank, 80 bins, no dither, mean-normalised over time).
Without a prompt the default speaker is used: no prompt tokens or mel and an all-zero x-vector
(the flow's speaker affine layer then contributes its bias only).

Documented behaviour for awkward input (errors name the problem: AudioError for the prompt audio,
TalkerError for the rest; both are UserErrors):
  * empty or whitespace-only text, text that encodes to the tokenizer's unknown token or to ids
    outside the LM's text vocabulary: error;
  * prompt audio at any sample rate or channel count: averaged to mono and resampled (soxr);
  * prompt audio shorter than 0.5 s, longer than 30 s, silent (peak below 1e-4, -80 dBFS), or
    holding NaN/inf: error; a prompt without prompt text: error;
  * a prompt when the release has no campplus.onnx (or onnxruntime is not installed), or no
    speech tokenizer: error naming the missing piece (speak without a prompt instead);
  * NaN/inf in a mel (the prompt's or the flow's output): error before vocoding.
Text is tokenised as given: the reference's text normalisation (wetext/ttsfrd) and sentence
splitting are not applied.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.hift.model import flow_mel_settings, log_mel
from hellochat_jax.components.speech_lm import model as slm
from hellochat_jax.core import dsp
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import SamplingMethod
from hellochat_jax.core.errors import UserError

QWEN_FOLDER = "CosyVoice-BlankEN"
# CosyVoice2Tokenizer adds these to the Qwen2 tokenizer (cosyvoice/tokenizer/tokenizer.py).
SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
        "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
        "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
    ],
}
PROMPT_MIN_SECONDS, PROMPT_MAX_SECONDS = 0.5, 30.0
SILENCE_PEAK = 1e-4
MEL_FLOOR = float(np.log(1e-5))  # log-mel of silence in the flow's mel (clamp at 1e-5)
# CosyVoice2Model streaming: token hops of 25, doubling up to 100; flow look-ahead from the config.
TOKEN_HOP, TOKEN_MAX_HOP, HOP_SCALE = 25, 100, 2
# The flow's start noise is one fixed buffer (the reference's `rand_noise`: 300 s of 50 Hz mel)
# whose first frames every call uses, so a growing prefix keeps its frames and every call
# passes the same shape.
NOISE_FRAMES = 15000
END_OF_PROMPT = "<|endofprompt|>"  # ends a CosyVoice 2 instruction (the LM prompt text of instruct mode)


class TalkerError(UserError):
    """Input the talker cannot use, or a missing part; the message says which."""


# ----------------------------------------------------------------------------- audio front ends


def check_prompt_audio(wav: np.ndarray, rate: int, where: str = "prompt audio") -> None:
    """A voice prompt must be 0.5-30 s of mono audio that is not silent (see dsp.to_mono for
    the rest: samples, dtype, NaN/inf)."""
    seconds = wav.size / rate
    if seconds < PROMPT_MIN_SECONDS:
        raise dsp.AudioError(f"{where}: too short ({seconds:.2f} s); a voice prompt needs at least {PROMPT_MIN_SECONDS} s of speech")
    if seconds > PROMPT_MAX_SECONDS:
        raise dsp.AudioError(f"{where}: too long ({seconds:.1f} s); the speech tokenizer takes prompts up to {PROMPT_MAX_SECONDS:.0f} s")
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        raise dsp.AudioError(f"{where}: silent (peak {peak:.1e}, below {SILENCE_PEAK:.0e}); a voice prompt must contain speech")


def flow_mel(wav: np.ndarray, rate: int = 24000, *, n_fft: int = 1920, hop: int = 480, n_mels: int = 80, fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """The flow's mel features [frames, n_mels] of mono audio [samples] at `rate` (`hift.model.log_mel`;
    the defaults are the 24 kHz release's, `flow_mel_settings(vocoder cfg)` gives any vocoder's).
    Needs more than (n_fft - hop) / 2 samples."""
    return np.asarray(log_mel(wav, rate=rate, n_fft=n_fft, hop=hop, n_mels=n_mels, fmin=fmin, fmax=fmax))


def kaldi_fbank(wav16: np.ndarray) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)
    via kaldi_native_fbank, mean-normalised over time (CosyVoice's x-vector input). [T, 80]."""
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        raise TalkerError("voice prompts need kaldi_native_fbank for the speaker features: pip install 'hellochat-jax[onnx]'") from None
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wav16.astype(np.float32).tolist())
    fbank.input_finished()
    feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
    return feats - feats.mean(axis=0, keepdims=True)


class SpeakerEncoder:
    """campplus.onnx through onnxruntime: fbank [T, 80] -> x-vector [192]."""

    def __init__(self, path: str | os.PathLike):
        try:
            import onnxruntime
        except ImportError:
            raise TalkerError(f"{path}: running campplus.onnx needs onnxruntime: pip install 'hellochat-jax[onnx]'") from None
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, wav16: np.ndarray) -> np.ndarray:
        feats = kaldi_fbank(wav16)
        return np.asarray(self.session.run(None, {self.input_name: feats[None]})[0], np.float32).reshape(-1)


@dataclasses.dataclass
class VoicePrompt:
    """A zero-shot voice: what the LM and the flow are conditioned on."""

    text_tokens: list[int]
    speech_tokens: np.ndarray  # [P] int32, S3 tokens of the prompt audio
    mel: np.ndarray  # [2P, 80] the prompt's flow mel
    xvector: np.ndarray  # [spk_embed_dim]


# ----------------------------------------------------------------------------- compiled steps


@nnx.jit
def _flow(flow, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding, noise, streaming, finalize):
    # streaming / finalize are traced booleans: streamed chunks and the final call share a program.
    return flow.inference(
        token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding,
        noise=noise, streaming=streaming, finalize=finalize,
    )


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def shape_bucket(n: int, smallest: int = 32, step: int = 256) -> int:
    """The padded size for n tokens or frames: powers of two from `smallest` up to `step`,
    then multiples of `step`. Every flow and vocoder call is padded to one of these, so a
    stream of growing chunks reuses a handful of compiled programs instead of one per chunk."""
    if n <= step:
        return max(smallest, 1 << max(0, int(n) - 1).bit_length())
    return _round_up(int(n), step)


# ----------------------------------------------------------------------------- the talker


class Talker:
    def __init__(self, llm, flow, hift, tokenizer, *, s3tokenizer=None, speaker_encoder: SpeakerEncoder | None = None, mesh=None, missing: dict[str, str] | None = None):
        self.llm, self.flow, self.hift = llm, flow, hift
        self.tokenizer = tokenizer
        self.s3tokenizer = s3tokenizer
        self.speaker_encoder = speaker_encoder
        self.mesh = mesh
        self.missing = missing or {}  # part -> why it is unavailable

    # -- loading

    @classmethod
    def load(cls, path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = shd.DEFAULT_RULES, *, dtype: str | None = None, progress: bool = False) -> "Talker":
        """A model folder with talker, flow and HiFT parts (`checkpoint.folder`), a converted
        talker folder (`hellochat convert cosyvoice2`) or a release folder."""
        from hellochat_jax.checkpoint.io import META_FILE, CheckpointError, read_meta
        from hellochat_jax.components.cosyvoice2 import weights as release

        path = Path(path)
        mesh = mesh if mesh is not None else shd.make_mesh()
        over = {"dtype": dtype} if dtype else {}
        missing: dict[str, str] = {}
        s3 = None
        tokenizer_dir = path / QWEN_FOLDER
        if (path / META_FILE).exists() and read_meta(path)["component"] == "hellochat":
            from hellochat_jax.checkpoint.folder import load_model_folder

            bundle = load_model_folder(path, mesh, rules)
            absent = [p for p in ("talker", "flow", "hift") if getattr(bundle.model, p) is None]
            if absent or bundle.tokenizer_dir("talker") is None:
                raise TalkerError(f"{path}: the model folder has no {', '.join(absent) or 'talker tokenizer'}; it cannot speak")
            llm, flow, hift = bundle.model.talker, bundle.model.flow, bundle.model.hift
            tokenizer_dir = bundle.tokenizer_dir("talker")
            missing["s3tokenizer"] = f"{path}: the model folder holds no speech tokenizer"
        elif (path / release.MANIFEST).exists():
            manifest = release.read_manifest(path)
            _, llm = release.load_part(path, "llm", mesh, rules, **over)
            _, flow = release.load_part(path, "flow", mesh, rules, **over)
            _, hift = release.load_part(path, "hift", mesh, rules, **over)
            if "s3tokenizer" in manifest["parts"]:
                _, s3 = release.load_part(path, "s3tokenizer", mesh, rules)
            else:
                missing["s3tokenizer"] = "; ".join(n for n in manifest.get("notes", []) if "token" in n) or "the converted folder has no speech tokenizer"
        else:
            from hellochat_jax.components.flow import weights as cosyvoice2_flow
            from hellochat_jax.components.hift import weights as cosyvoice2_hift
            from hellochat_jax.components.s3tokenizer import weights as s3tokenizer
            from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm

            try:
                release.check_release(path)
            except CheckpointError as e:
                raise TalkerError(f"{e} (and no {release.MANIFEST}: not a converted talker either)") from None
            _, llm = cosyvoice2_llm.load(path, mesh, rules, progress=progress, **over)
            _, flow = cosyvoice2_flow.load(path, mesh, rules, progress=progress, **over)
            _, hift = cosyvoice2_hift.load(path, mesh, rules, progress=progress, **over)
            src = next((path / n for n in (release.S3_PT, release.S3_ONNX) if (path / n).exists()), None)
            if src is None:
                missing["s3tokenizer"] = f"{path} has no {release.S3_ONNX}"
            else:
                try:
                    _, s3 = s3tokenizer.load(src, mesh, rules)
                except CheckpointError as e:
                    missing["s3tokenizer"] = str(e)
        if hasattr(hift, "fold_weight_norm"):
            hift = hift.fold_weight_norm()  # inference copy: kernels computed once, not per call
        tokenizer = load_tokenizer(tokenizer_dir)
        speaker = None
        campplus = path / "campplus.onnx"
        if not campplus.exists():
            missing["campplus"] = f"{path} has no campplus.onnx (the speaker-embedding network)"
        else:
            try:
                speaker = SpeakerEncoder(campplus)
            except TalkerError as e:
                missing["campplus"] = str(e)
        return cls(llm, flow, hift, tokenizer, s3tokenizer=s3, speaker_encoder=speaker, mesh=mesh, missing=missing)

    @property
    def sample_rate(self) -> int:
        return int(self.hift.cfg.sampling_rate)

    # -- text

    def encode_text(self, text: str, what: str = "text") -> list[int]:
        if not isinstance(text, str):
            raise TalkerError(f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise TalkerError(f"{what} is empty: nothing to say")
        ids = list(self.tokenizer([text])["input_ids"][0])
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and unk in ids:
            raise TalkerError(f"{what} {text!r}: the tokenizer cannot encode part of it (it maps to the unknown token {self.tokenizer.unk_token!r})")
        vocab = self.llm.cfg.qwen2.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise TalkerError(f"{what} {text!r}: token ids {bad[:5]} lie outside the LM's text vocabulary of {vocab}")
        if not ids:
            raise TalkerError(f"{what} {text!r} encodes to no tokens")
        return ids

    def instruct_text(self, instruction: str) -> list[int]:
        """The speech LM's prompt text in CosyVoice 2 instruct mode (inference_instruct2):
        ``instruction<|endofprompt|>``; it takes the place of a voice prompt in the LM (no
        prompt speech), while a voice prompt still conditions the flow."""
        eop = self.tokenizer.convert_tokens_to_ids(END_OF_PROMPT)
        return self.encode_text(instruction, "style instruction") + [int(eop)]

    # -- voice prompt

    def make_prompt(self, wav: str | os.PathLike | np.ndarray, prompt_text: str | None, sample_rate: int | None = None) -> VoicePrompt:
        """A zero-shot voice from prompt audio (a file, or samples with their rate) and its transcript."""
        from hellochat_jax.components.s3tokenizer import model as s3

        where = str(wav) if not isinstance(wav, np.ndarray) else "prompt audio"
        if prompt_text is None or not str(prompt_text).strip():
            raise TalkerError("a voice prompt needs its transcript (prompt text)")
        for part in ("s3tokenizer", "campplus"):
            if part in self.missing:
                raise TalkerError(f"voice prompts are unavailable: {self.missing[part]}; speak without a prompt to use the default speaker")
        if isinstance(wav, np.ndarray):
            if sample_rate is None:
                raise TalkerError("prompt samples need their sample rate")
            samples = wav
        else:
            samples, sample_rate = dsp.read(wav)
        samples = dsp.to_mono(samples, sample_rate, where)
        check_prompt_audio(samples, sample_rate, where)
        text_tokens = self.encode_text(prompt_text, "prompt text")
        wav16 = dsp.resample(samples, sample_rate, s3.SAMPLE_RATE)
        wav_out = dsp.resample(samples, sample_rate, self.sample_rate)  # the vocoder's rate
        tokens, lengths = s3.tokenize(self.s3tokenizer, wav16[None], mesh=self.mesh)
        tokens = np.asarray(tokens[0, : lengths[0]], np.int32)
        mel = flow_mel(wav_out, **flow_mel_settings(self.hift.cfg))
        n = min(mel.shape[0] // 2, len(tokens))  # CosyVoice 2: 2 mel frames per token
        if n == 0:
            raise dsp.AudioError(f"{where}: too short to give one speech token")
        xvector = self.speaker_encoder(wav16)
        return VoicePrompt(text_tokens, tokens[:n], mel[: 2 * n], xvector)

    def _prompt(self, prompt_wav, prompt_text, sample_rate=None) -> VoicePrompt | None:
        if prompt_wav is None:
            if prompt_text:
                raise TalkerError("prompt text was given without prompt audio")
            return None
        if isinstance(prompt_wav, VoicePrompt):
            return prompt_wav
        return self.make_prompt(prompt_wav, prompt_text, sample_rate)

    def _check_prompt(self, prompt: VoicePrompt | None) -> None:
        if prompt is None:
            return
        if not np.isfinite(prompt.mel).all():
            raise TalkerError("the voice prompt's mel holds NaN or inf values")
        if prompt.mel.ndim != 2 or prompt.mel.shape != (2 * len(prompt.speech_tokens), self.flow.cfg.output_size):
            raise TalkerError(f"the voice prompt's mel must be [2 x {len(prompt.speech_tokens)} tokens, {self.flow.cfg.output_size}], got {prompt.mel.shape}")

    # -- stages

    def speech_decoder(self, texts: Sequence[list[int]], prompt: VoicePrompt | None, key: jax.Array, sampling: SamplingMethod | None,
                       instructions: Sequence[str | None] | None = None, max_ratio: float = 20.0) -> slm.SpeechDecoder:
        """`instructions` (one per text, None = none): rows with one speak in instruct mode
        (`instruct_text`) instead of with the voice prompt's text and speech tokens. A row stops
        after `max_ratio` speech tokens per text token (CosyVoice 2: 20)."""
        n = len(texts)
        instructions = [None] * n if instructions is None else list(instructions)
        if len(instructions) != n:
            raise TalkerError(f"{n} texts but {len(instructions)} instructions")
        pt = [self.instruct_text(s) if s else (prompt.text_tokens if prompt else []) for s in instructions]
        ps = [[] if s else (prompt.speech_tokens.tolist() if prompt else []) for s in instructions]
        return slm.SpeechDecoder.start(self.llm, texts, pt, ps, key=key, sampling=sampling, max_ratio=max_ratio, mesh=self.mesh)

    def _flow_inputs(self, batch: int, prompt: VoicePrompt | None, styles: Sequence[str | None] | None = None):
        d = self.flow.cfg.spk_embed_dim
        if prompt is None:
            # no voice: the x-vector of each row's style (model.flow.style_speakers; zeros without)
            xvectors = self.flow.cfg.style_xvectors([None] * batch if styles is None else styles)
            return (np.zeros((batch, 0), np.int32), np.zeros((batch,), np.int32), np.zeros((batch, 0, self.flow.cfg.output_size), np.float32),
                    np.zeros((batch,), np.int32), xvectors)
        p = len(prompt.speech_tokens)
        if prompt.xvector.shape != (d,):
            raise TalkerError(f"the speaker x-vector has shape {prompt.xvector.shape}; the flow expects ({d},)")
        return (np.tile(prompt.speech_tokens[None], (batch, 1)), np.full((batch,), p, np.int32), np.tile(prompt.mel[None], (batch, 1, 1)),
                np.full((batch,), 2 * p, np.int32), np.tile(prompt.xvector[None], (batch, 1)).astype(np.float32))

    def tokens_to_mel(self, tokens: Sequence[Sequence[int]], prompt: VoicePrompt | None, noise: jax.Array, *, token_len: Sequence[int] | None = None,
                      streaming: bool = False, finalize: bool = True, styles: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Flow on token rows padded to a `shape_bucket` -> (mel [B, W, 80], mel_len [B]) of the
        new frames; `styles` (one per row) are the instructions the rows were spoken with."""
        b = len(tokens)
        lengths = np.asarray([len(t) for t in tokens] if token_len is None else token_len, np.int32)
        n = shape_bucket(int(lengths.max(initial=0)))
        p = 0 if prompt is None else len(prompt.speech_tokens)
        if self.flow.cfg.token_mel_ratio * (p + n) > noise.shape[1]:
            raise TalkerError(f"{p + n} speech tokens (prompt included) are more than the flow's noise buffer covers ({noise.shape[1] // self.flow.cfg.token_mel_ratio})")
        tok = np.zeros((b, n), np.int32)
        for i, t in enumerate(tokens):
            tok[i, : len(t)] = t
        if styles is not None and len(styles) != b:
            raise TalkerError(f"{b} token rows but {len(styles)} styles")
        pt, ptl, pf, pfl, emb = self._flow_inputs(b, prompt, styles)
        args = (tok, lengths, pt, ptl, pf, pfl, emb)
        with _mesh_ctx(self.mesh):
            args = shd.put_batch(args, self.mesh) if self.mesh is not None else tuple(map(jnp.asarray, args))
            mel, mel_len = _flow(self.flow, *args, noise, jnp.asarray(streaming), jnp.asarray(finalize))
        return np.asarray(jax.device_get(mel)), np.asarray(jax.device_get(mel_len))

    def vocode(self, mel: np.ndarray, mel_len: np.ndarray, key: jax.Array) -> list[np.ndarray]:
        """mel [B, T, 80] with valid lengths -> waveforms (one per row), frames past a row's
        length vocoded as silence and cut off."""
        from hellochat_jax.components.hift.model import synthesize

        b, t, _ = mel.shape
        mel = np.where(np.arange(t)[None, :, None] < mel_len[:, None, None], mel, MEL_FLOOR).astype(np.float32)
        _check_mel(mel)
        with _mesh_ctx(self.mesh):
            speech, _ = synthesize(self.hift, mel.transpose(0, 2, 1), key=key)
        speech = np.asarray(jax.device_get(speech))
        per = self.hift.cfg.samples_per_frame
        return [speech[i, : int(mel_len[i]) * per] for i in range(b)]

    def _noise(self, key: jax.Array) -> jax.Array:
        """The flow's start noise (see NOISE_FRAMES)."""
        return jax.random.normal(key, (1, NOISE_FRAMES, self.flow.cfg.output_size), jnp.float32)

    # -- speaking

    def speak(self, texts: str | Sequence[str], prompt_wav=None, prompt_text: str | None = None, *, key: jax.Array | None = None,
              sampling: SamplingMethod | None = None, prompt_sample_rate: int | None = None,
              instructions: Sequence[str | None] | None = None, max_ratio: float = 20.0) -> list[np.ndarray]:
        """Speech (float32, sample_rate Hz) for each text, all in one batch; `instructions`
        (one per text, None = none) says how to speak it (CosyVoice 2 instruct, see `instruct_text`);
        at most `max_ratio` speech tokens per text token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise TalkerError("no texts to speak")
        ids = [self.encode_text(t, f"text {i}" if len(texts) > 1 else "text") for i, t in enumerate(texts)]
        prompt = self._prompt(prompt_wav, prompt_text, prompt_sample_rate)
        self._check_prompt(prompt)
        key = jax.random.key(0) if key is None else key
        k_lm, k_noise, k_voc = jax.random.split(key, 3)
        dec = self.speech_decoder(ids, prompt, k_lm, sampling, instructions, max_ratio).advance()
        toks, lens = dec.result()
        tokens = [toks[i, : lens[i]].tolist() for i in range(len(ids))]
        if max(lens) == 0:
            return [np.zeros(0, np.float32) for _ in ids]
        mel, mel_len = self.tokens_to_mel(tokens, prompt, self._noise(k_noise), styles=instructions)
        return self.vocode(mel, mel_len, k_voc)

    def speak_stream(self, text: str, prompt_wav=None, prompt_text: str | None = None, *, key: jax.Array | None = None,
                     sampling: SamplingMethod | None = None, prompt_sample_rate: int | None = None,
                     instruction: str | None = None) -> Iterator[np.ndarray]:
        """Yields audio chunks of one text as its speech tokens arrive (see `SpeechStream`);
        the LM decodes just as many tokens as the next chunk needs. Concatenating the chunks
        gives the utterance. `instruction`: how to speak it, as in `speak`."""
        ids = self.encode_text(text)
        prompt = self._prompt(prompt_wav, prompt_text, prompt_sample_rate)
        self._check_prompt(prompt)
        key = jax.random.key(0) if key is None else key
        k_lm, k_noise, k_voc = jax.random.split(key, 3)
        dec = self.speech_decoder([ids], prompt, k_lm, sampling, [instruction])
        stream = SpeechStream(self, prompt, noise_key=k_noise, vocoder_key=k_voc, style=instruction)
        while not dec.finished:
            dec.advance(max(1, stream.tokens_wanted))
            yield from stream.push(dec.new_tokens()[0])
        yield from stream.finish()

    def stream(self, prompt: VoicePrompt | None = None, *, key: jax.Array | None = None, style: str | None = None) -> "SpeechStream":
        """A `SpeechStream` for tokens from elsewhere (e.g. a BistreamDecoder fed by the
        thinker) spoken in `style` (the instruction); `key` is split as `speak` splits it (LM,
        noise, vocoder)."""
        self._check_prompt(prompt)
        _, k_noise, k_voc = jax.random.split(jax.random.key(0) if key is None else key, 3)
        return SpeechStream(self, prompt, noise_key=k_noise, vocoder_key=k_voc, style=style)


class SpeechStream:
    """Audio for the speech tokens of one utterance as they arrive (CosyVoice2Model's
    streaming token2wav), batch 1.

    Every hop of tokens (25, doubling up to 100; the first hop also covers the prompt's padding
    to a multiple of 25) plus the flow's look-ahead, the flow re-runs on all tokens so far with
    chunk masks and finalize=False, and the new mel frames go through the vocoder with its
    source cache and cross-fade; `finish` runs the rest without chunk masks (as the reference's
    last call). Token rows and vocoder chunks are padded to `shape_bucket` sizes and the noise
    is one fixed buffer, so after the first few chunks nothing compiles again."""

    def __init__(self, talker: Talker, prompt: VoicePrompt | None, *, noise_key: jax.Array, vocoder_key: jax.Array, style: str | None = None):
        self.talker, self.prompt, self.style = talker, prompt, style
        self.noise = talker._noise(noise_key)
        self.vocoder_key = vocoder_key
        self.ratio, self.lookahead = talker.flow.cfg.token_mel_ratio, talker.flow.cfg.pre_lookahead_len
        p = 0 if prompt is None else len(prompt.speech_tokens)
        self.prompt_pad = int(math.ceil(p / TOKEN_HOP) * TOKEN_HOP - p)
        self.tokens: list[int] = []
        self.hop, self.offset, self.chunks = TOKEN_HOP, 0, 0
        self.cache = None
        self.finished = False

    def _this_hop(self) -> int:
        return self.hop + self.prompt_pad if self.offset == 0 else self.hop

    @property
    def tokens_wanted(self) -> int:
        """How many more tokens the next chunk needs."""
        return max(0, self.offset + self._this_hop() + self.lookahead - len(self.tokens))

    def push(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """Adds speech tokens; returns the audio chunks they complete (often none)."""
        if self.finished:
            raise RuntimeError("push after finish()")
        self.tokens += [int(t) for t in tokens]
        out = []
        while self.tokens_wanted == 0:
            this_hop = self._this_hop()
            mel, mel_len = self.talker.tokens_to_mel([self.tokens[: self.offset + this_hop + self.lookahead]], self.prompt, self.noise, streaming=True, finalize=False,
                                                     styles=[self.style])
            out.append(self._vocode(mel[:, self.offset * self.ratio : int(mel_len[0])], finalize=False))
            self.offset += this_hop
            self.hop = min(TOKEN_MAX_HOP, self.hop * HOP_SCALE)
        return out

    def finish(self) -> list[np.ndarray]:
        """No more tokens: the rest of the audio (at most one chunk)."""
        if self.finished or not self.tokens:
            self.finished = True
            return []
        self.finished = True
        mel, mel_len = self.talker.tokens_to_mel([self.tokens], self.prompt, self.noise, streaming=False, finalize=True, styles=[self.style])
        new = mel[:, self.offset * self.ratio : int(mel_len[0])]
        if new.shape[1] == 0 and self.cache is None:
            return []
        return [self._vocode(new, finalize=True)]

    def _vocode(self, mel: np.ndarray, finalize: bool) -> np.ndarray:
        from hellochat_jax.components.hift import model as hift_lib

        _check_mel(mel)
        frames = mel.shape[1] + (0 if self.cache is None else hift_lib.MEL_CACHE_FRAMES)
        with _mesh_ctx(self.talker.mesh):
            audio, self.cache = hift_lib.stream_step(
                self.talker.hift, mel.transpose(0, 2, 1), self.cache, key=jax.random.fold_in(self.vocoder_key, self.chunks),
                finalize=finalize, pad_to=shape_bucket(frames), pad_value=MEL_FLOOR,
            )
        self.chunks += 1
        return audio[0]


def _check_mel(mel: np.ndarray) -> None:
    bad = ~np.isfinite(mel)
    if bad.any():
        raise TalkerError(f"the flow produced a mel with {int(bad.sum())} NaN/inf value(s); refusing to vocode it")


def load_tokenizer(folder: str | os.PathLike):
    """CosyVoice 2's text tokenizer: the Qwen2 tokenizer in CosyVoice-BlankEN/ plus its
    special tokens (CosyVoice2Tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise TalkerError(f"{folder}: the text tokenizer folder is missing")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise TalkerError(f"{folder}: cannot load the text tokenizer ({str(e).splitlines()[0]})") from None
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _mesh_ctx(mesh):
    return jax.set_mesh(mesh) if mesh is not None else _null()
