"""The tiny synthetic corpus the data tests share: built once per test session (a few seconds),
into the session's temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hellochat_jax.cli.data import build_synth
    from hellochat_jax.data import builders

    root = tmp_path_factory.getbasetemp() / "hellochat_data"
    version = str(builders.HellochatSynth.VERSION)
    done = root / "hellochat_synth" / "tiny" / version / "tokenizer" / "tokenizer.json"
    if not done.is_file():  # several test modules import this; the first one builds
        build_synth(builders.SYNTH_TINY, str(root), workers=1)
    return builders.dataset_dir("hellochat_synth/tiny", str(root))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return tiny_corpus_dir(tmp_path_factory)
