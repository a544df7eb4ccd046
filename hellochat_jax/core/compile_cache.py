"""The persistent XLA compilation cache: a second run of a command reuses the programs the
first one compiled (cold start in seconds instead of minutes for the chat pipeline)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path("~/.cache/hellochat/jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns the cache on (folder: `path`, else $HELLOCHAT_JAX_CACHE, else ~/.cache/hellochat/jax).
    Every program is cached, however quick its compile: the pipelines have many small ones."""
    import jax

    folder = Path(path or os.environ.get("HELLOCHAT_JAX_CACHE") or DEFAULT_DIR).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
