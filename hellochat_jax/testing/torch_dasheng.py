"""The PyTorch reference for Dasheng.

Preferred: the `dasheng` 0.0.9 package. Its front end imports torchaudio, which has no build
here (and `pip install dasheng` would pull it in, so the package cannot be a test
requirement): a ~40-line stand-in for the two torchaudio transforms it uses (MelSpectrogram,
AmplitudeToDB; torchaudio 2.x semantics, same buffer names) is put in sys.modules only while
dasheng is imported, so nothing else in the session sees it.

Fallback when dasheng is not installed: `SmallDasheng`, a plain-torch transcription of the
release's forward pass (the fixture's `call` text), checked against the fixture in the tests.

Used by tests/test_dasheng.py and bench/encoder.py (needs torch; dasheng optional).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types


def _stub_transforms():
    import torch
    from torch import nn

    from hellochat_jax.components.dasheng.model import DashengConfig
    from hellochat_jax.components.dasheng.weights import torchaudio_buffers

    class _Holder(nn.Module):
        def __init__(self, name, value):
            super().__init__()
            self.register_buffer(name, value)

    class MelSpectrogram(nn.Module):
        """torchaudio.transforms.MelSpectrogram(power=2, center, reflect, htk, norm=None)."""

        def __init__(self, sample_rate=16000, n_fft=400, win_length=None, hop_length=None, f_min=0.0, f_max=None,
                     n_mels=128, center=True, pad_mode="reflect", power=2.0, **unused):
            super().__init__()
            win_length = win_length or n_fft
            cfg = DashengConfig(n_fft=n_fft, win_size=win_length, hop_size=hop_length or win_length // 2, f_min=f_min,
                                f_max=f_max if f_max is not None else sample_rate / 2, n_mels=n_mels, sample_rate=sample_rate,
                                patch_size=(n_mels, 4), patch_stride=(n_mels, 4))
            window, fb = torchaudio_buffers(cfg)
            self.n_fft, self.hop, self.win, self.center, self.pad_mode = n_fft, cfg.hop_size, win_length, center, pad_mode
            self.spectrogram = _Holder("window", window)
            self.mel_scale = _Holder("fb", fb)

        def forward(self, x):
            spec = torch.stft(x, self.n_fft, self.hop, self.win, self.spectrogram.window, center=self.center,
                              pad_mode=self.pad_mode, normalized=False, onesided=True, return_complex=True)
            power = spec.abs().pow(2.0)
            return torch.matmul(power.transpose(-1, -2), self.mel_scale.fb).transpose(-1, -2)

    class AmplitudeToDB(nn.Module):
        """torchaudio's: 10 log10(max(x, 1e-10)), then the top_db floor over the packed
        [..., channels, freq, time] block: a 3-D input is ONE block (batch-wide max)."""

        def __init__(self, stype="power", top_db=None):
            super().__init__()
            self.top_db = top_db

        def forward(self, x):
            db = 10.0 * torch.log10(torch.clamp(x, min=1e-10))
            if self.top_db is not None:
                shape = db.size()
                channels = shape[-3] if db.dim() > 2 else 1
                packed = db.reshape(-1, channels, shape[-2], shape[-1])
                packed = torch.max(packed, (packed.amax(dim=(-3, -2, -1)) - self.top_db).view(-1, 1, 1, 1))
                db = packed.reshape(shape)
            return db

    transforms = types.ModuleType("torchaudio.transforms")
    transforms.MelSpectrogram, transforms.AmplitudeToDB = MelSpectrogram, AmplitudeToDB
    package = types.ModuleType("torchaudio")
    package.transforms = transforms
    return package, transforms


@contextlib.contextmanager
def _torchaudio_stub():
    if importlib.util.find_spec("torchaudio") is not None:
        yield  # the real one
        return
    package, transforms = _stub_transforms()
    sys.modules["torchaudio"], sys.modules["torchaudio.transforms"] = package, transforms
    try:
        yield
    finally:
        sys.modules.pop("torchaudio", None)
        sys.modules.pop("torchaudio.transforms", None)


def reference_class():
    """dasheng.pretrained.pretrained.Dasheng, or None (with the reason) when dasheng is absent."""
    if importlib.util.find_spec("dasheng") is None:
        return None, "the `dasheng` package is not installed (pip install --no-deps dasheng==0.0.9 einops)"
    try:
        with _torchaudio_stub():
            from dasheng.pretrained.pretrained import Dasheng
    except ImportError as e:
        return None, f"dasheng does not import: {e}"
    return Dasheng, ""


def _small_dasheng_class():
    import torch
    import torch.nn.functional as F

    class SmallDasheng(torch.nn.Module):
        """The release's inference path from its state dict: front end, eval BatchNorm, patch
        conv, 252-patch chunks with restarting time positions, key-masked pre-norm ViT."""

        def __init__(self, config: dict, state_dict: dict):
            super().__init__()
            _, transforms = _stub_transforms()
            self.config = dict(config)
            c = self.config
            self.front_end = torch.nn.Sequential(
                transforms.MelSpectrogram(sample_rate=16000, n_fft=c["n_fft"], win_length=c["win_size"], hop_length=c["hop_size"],
                                          f_min=c["f_min"], f_max=c["f_max"], n_mels=c["n_mels"], center=c["center"]),
                transforms.AmplitudeToDB(top_db=120),
            )
            self.sd = {k: v.float() for k, v in state_dict.items()}

        def _block(self, x, i, mask):
            sd, heads = self.sd, self.config["num_heads"]
            p = f"blocks.{i}."
            b, n, d = x.shape
            h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
            q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
            if mask is not None:
                scores = scores.masked_fill(mask[:, None, None, :], torch.finfo(scores.dtype).min)
            attn = torch.nan_to_num(scores.softmax(-1))
            h = F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            x = x + (h * sd[p + "ls1.gamma"] if p + "ls1.gamma" in sd else h)
            h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            return x + (h * sd[p + "ls2.gamma"] if p + "ls2.gamma" in sd else h)

        def forward(self, waveform, x_length=None):
            sd, c = self.sd, self.config
            x = self.front_end(waveform)[:, None]  # [B, 1, mels, T]
            x = F.batch_norm(x.transpose(1, 2), sd["init_bn.1.running_mean"], sd["init_bn.1.running_var"],
                             sd["init_bn.1.weight"], sd["init_bn.1.bias"], False, 0.0, 1e-5).transpose(1, 2)
            x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=tuple(c["patch_stride"]))
            t = x.shape[-1]
            per_chunk = c["target_length"] // 4
            mask = None
            if x_length is not None:
                mask = torch.arange(t)[None, :] >= (x_length / (c["hop_size"] * 4)).long()[:, None]
            outputs = []
            for start in range(0, t, per_chunk):
                chunk = x[..., start : start + per_chunk]
                chunk = chunk + sd["time_pos_embed"][..., : chunk.shape[-1]] + sd["freq_pos_embed"]
                chunk = chunk.flatten(2).transpose(1, 2)  # b c f t -> b (f t) c
                m = None if mask is None else mask[:, start : start + per_chunk]
                for i in range(c["depth"]):
                    chunk = self._block(chunk, i, m)
                outputs.append(F.layer_norm(chunk, (chunk.shape[-1],), sd["norm.weight"], sd["norm.bias"], 1e-6))
            return torch.cat(outputs, dim=1)

    return SmallDasheng


def load_reference(path):
    """(reference module, its name) for a release .pt: the dasheng package if it imports,
    else SmallDasheng."""
    import torch

    Dasheng, why = reference_class()
    if Dasheng is not None:
        return Dasheng.from_pretrained(str(path)).eval(), "dasheng 0.0.9 (torchaudio stubbed)"
    dump = torch.load(path, map_location="cpu", weights_only=True)
    return _small_dasheng_class()(dump["config"], dump["model"]).eval(), f"hellochat_jax.testing.torch_dasheng.SmallDasheng ({why})"
