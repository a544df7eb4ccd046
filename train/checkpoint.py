"""Training checkpoints: one Orbax `CheckpointManager` step directory per save, holding

    state  the train state pytree: trainable params, other model variables, optimizer state,
           step, RNG key, skip counters (sharded arrays; each process writes its shards)
    data   the grain iterator position, one JSON file per process (grain's handler)
    meta   step, mesh shape and task names (JSON), for people reading the directory

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the
iterator state is written; the files are committed in the background, and a step directory
only appears (renamed from a temporary name) when complete, so a crash never leaves a
half-written "latest" checkpoint. Restore takes target shardings, so a checkpoint written on
one mesh restores onto any other mesh or device count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any] | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({"step": int(step), **(meta or {})}),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """`abstract_state`: the state's structure with ShapeDtypeStruct leaves carrying the
        TARGET shardings. The iterator (if given) is restored in place."""
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings, the form `restore` wants. `shardings` may
    stop at nnx Variables (one sharding for the Variable's value), as `shardings_for` gives."""

    def one(x, sharding):
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), x)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
