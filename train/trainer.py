"""The trainer: mesh, sharded model and optimizer state, one compiled train step, the loop.

The train state is one pytree (a dict), laid out by the logical-axis rules:

    params     trainable variables (nnx.State)        sharded like the model
    rest       every other model variable             (frozen groups, LoRA bases, statistics)
    opt        optax state of `params`                mu/nu sharded like params
    step       loop steps taken (int32)               a skipped step counts too
    rng        base PRNG key data (uint32[2])         step keys are fold_in(rng, step)
    skipped    non-finite steps so far (int32)
    bad_in_row consecutive non-finite steps (int32)

One step = `grad_accum` micro-batches scanned inside the compiled function, then one update.
A step whose loss or gradient is not finite leaves params and optimizer state untouched
(selected inside the step, no host round trip) and is counted; `max_bad_steps` in a row stop
the run with a checkpoint of the last good state.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hellochat_jax.train import data as data_lib
from hellochat_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from hellochat_jax.train.config import TrainConfig, validate
from hellochat_jax.train.lora import trainable_filter
from hellochat_jax.train import stages
from hellochat_jax.train.metrics import (
    MetricsLogger,
    compiled_flops,
    peak_flops_per_device,
)
from hellochat_jax.train.model import HelloChat, build
from hellochat_jax.train.optim import make_optimizer, schedule
from jax.sharding import NamedSharding, PartitionSpec

from hellochat_jax.core import sharding as shd

EXIT_OK, EXIT_BAD_STEPS = 0, 3


def init_distributed(cfg) -> None:
    """Starts jax.distributed when the config (or the environment) asks for several processes."""
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.coordinator is None and cfg.num_processes is None:
        return  # single process, or TPU/SLURM where the caller initialises
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=cfg.local_device_ids,
    )


def make_data(cfg: TrainConfig) -> data_lib.TrainData:
    return stages.get(cfg.stage).data(cfg, jax.process_index(), jax.process_count())


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


class Trainer:
    def __init__(self, cfg: TrainConfig, data: data_lib.TrainData | None = None):
        self.cfg = cfg
        self.summary = ""
        init_distributed(cfg.distributed)
        # Every config/device mismatch is reported here, before any array exists.
        mesh_shape = validate(cfg, jax.device_count(), jax.process_count())
        self.mesh = shd.make_mesh(mesh_shape)
        self.rules = shd.rules_from_config(cfg.rules)
        self.stage = stages.get(cfg.stage)
        self.data = data if data is not None else make_data(cfg)
        self.objective = self.stage.objective(cfg, self.data)
        self.tx = make_optimizer(cfg)
        self.lr_schedule = schedule(cfg)

        m = cfg.model
        self.factory = build(m, cfg.seed, stages.parts_of(self.stage, cfg))
        self.trainable = trainable_filter(m.frozen, m.lora.groups if m.lora else [])
        abstract = shd.abstract_model(self.factory)
        self.graphdef, abs_params, abs_rest = nnx.split(abstract, self.trainable, ...)
        if not jax.tree.leaves(abs_params):
            raise ValueError("nothing to train: every parameter group is frozen")
        self.num_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))
        self.num_params = self.num_trainable + sum(math.prod(x.shape) for x in jax.tree.leaves(abs_rest))

        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_sh = shd.shardings_for(abs_params, self.mesh, self.rules)
        rest_sh = shd.shardings_for(abs_rest, self.mesh, self.rules)
        abs_opt = jax.eval_shape(self.tx.init, abs_params)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abs_opt, param_sh,
                                       transform_non_params=lambda _: replicated, is_leaf=_is_variable)
        self.state_shardings = {
            "params": param_sh, "rest": rest_sh, "opt": opt_sh,
            "step": replicated, "rng": replicated, "skipped": replicated, "bad_in_row": replicated,
        }
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        abs_state = {
            "params": abs_params, "rest": abs_rest, "opt": abs_opt, "step": scalar,
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "skipped": scalar, "bad_in_row": scalar,
        }
        self.abstract_state = abstract_with_shardings(abs_state, self.state_shardings)

        accum = cfg.optim.grad_accum
        self.batch_spec = data_lib.stacked_spec(self.data.local_spec(), accum, jax.process_count())
        self.batch_shardings = data_lib.input_shardings(self.batch_spec, self.mesh, self.rules)
        abstract_batch = abstract_with_shardings(self.batch_spec, self.batch_shardings)

        with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
            step = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,),
            )
            self.step_fn = step.lower(self.abstract_state, abstract_batch).compile()
        self.flops_per_step = compiled_flops(self.step_fn)

    # ------------------------------------------------------------------ the compiled step

    def _loss(self, params, rest, micro, key, norms):
        model = nnx.merge(self.graphdef, params, rest)
        return self.objective(model, micro, key, norms)

    def _train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        params, rest = state["params"], state["rest"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        norms = self.objective.normalizers(batch)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        accum = self.cfg.optim.grad_accum

        if accum == 1:
            (loss, stats), grads = grad_fn(params, rest, jax.tree.map(lambda x: x[0], batch), key, norms)
        else:
            def body(total, xs):
                i, micro = xs
                return _tree_add(total, grad_fn(params, rest, micro, jax.random.fold_in(key, i), norms)), None

            shapes = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], batch), key, norms)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, stats), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), batch))

        with jax.named_scope("optimizer"):  # the op class the benches' --profile reports
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            # Non-finite gradients would poison the optimizer moments even when the update is
            # discarded, so the update is computed from zeros and then thrown away.
            safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0), grads)
            updates, new_opt = self.tx.update(safe_grads, state["opt"], params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_params, new_opt = keep(new_params, params), keep(new_opt, state["opt"])
        bad = jnp.where(finite, 0, 1).astype(jnp.int32)
        new_state = {
            "params": new_params,
            "rest": rest,
            "opt": new_opt,
            "step": state["step"] + 1,
            "rng": state["rng"],
            "skipped": state["skipped"] + bad,
            "bad_in_row": jnp.where(finite, 0, state["bad_in_row"] + 1).astype(jnp.int32),
        }
        applied = state["step"] - state["skipped"]  # updates applied before this one
        metrics = dict(stats)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=self.lr_schedule(applied),
                       skipped=new_state["skipped"], bad_in_row=new_state["bad_in_row"], finite=finite)
        return new_state, metrics

    # ------------------------------------------------------------------ state

    def init_state(self) -> dict[str, Any]:
        """A fresh state, every array created directly in its sharding."""
        def init():
            model = self.factory()
            _, params, rest = nnx.split(model, self.trainable, ...)
            zero = jnp.zeros((), jnp.int32)
            return {"params": params, "rest": rest, "opt": self.tx.init(params), "step": zero,
                    "rng": jax.random.key_data(jax.random.key(self.cfg.seed)), "skipped": zero, "bad_in_row": zero}

        with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
            state = jax.jit(init, out_shardings=self.state_shardings)()
            state = self._init_mel_statistics(state)
        return self._init_from_checkpoints(state)

    def _init_mel_statistics(self, state):
        """An encoder trained from scratch gets its mel BatchNorm statistics (which it never
        updates: they are stored statistics, as in the release) from the first batch of the
        data, so that its inputs are normalised. Computed on the global batch: every process
        gets the same numbers."""
        model = self.cfg.model
        if model.encoder is None or "encoder" in model.init_from or "audio" not in self.batch_spec:
            return state
        if self.model(state).thinker is None:
            return state
        from hellochat_jax.components.dasheng import model as dasheng

        enc_cfg = self.model(state).thinker.audio_encoder.cfg
        iterator = self.data.iterator()  # a fresh one: the training stream is untouched
        batch = self.batch([next(iterator) for _ in range(self.cfg.optim.grad_accum)])

        def statistics(audio, lengths):
            audio = audio.reshape(-1, audio.shape[-1])
            lengths = lengths.reshape(-1)
            mel = dasheng.log_mel(audio, enc_cfg)  # [N, frames, mels]
            frames = 1 + lengths // enc_cfg.hop_size
            valid = ((jnp.arange(mel.shape[1])[None, :] < frames[:, None]) & (lengths[:, None] > 0))[..., None]
            count = jnp.maximum(jnp.sum(valid), 1)
            mean = jnp.sum(jnp.where(valid, mel, 0.0), axis=(0, 1)) / count
            var = jnp.sum(jnp.where(valid, jnp.square(mel - mean), 0.0), axis=(0, 1)) / count
            return mean, var

        mean, var = jax.jit(statistics)(batch["audio"], batch["audio_lengths"])
        bn = state["rest"]["thinker"]["audio_encoder"]["init_bn"]
        for name, value in (("mean", mean), ("var", var)):
            old = bn[name].get_value()
            bn[name].set_value(jax.device_put(value.astype(old.dtype), old.sharding))
        return state

    def _init_from_checkpoints(self, state):
        if not self.cfg.model.init_from:
            return state
        from hellochat_jax.train.init_from import load_groups

        return load_groups(self, state)

    def model(self, state: dict[str, Any]) -> HelloChat:
        return nnx.merge(self.graphdef, state["params"], state["rest"])

    def batch(self, micro_batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
        """This process's micro-batches -> the global step input."""
        prepare = getattr(self.data, "prepare", None)
        if prepare is not None:
            micro_batches = [prepare(b) for b in micro_batches]
        return data_lib.to_global(micro_batches, self.batch_spec, self.batch_shardings)

    def step(self, state, batch):
        return self.step_fn(state, batch)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> int:
        """Trains to `cfg.steps`; returns the process exit code."""
        cfg = self.cfg
        ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        iterator = self.data.iterator()
        latest = ckpt.latest_step() if resume else None
        if latest is not None:
            state = ckpt.restore(latest, self.abstract_state, iterator)
        else:
            state = self.init_state()
        start = int(jax.device_get(state["step"]))
        if latest is not None and start >= cfg.steps:
            ckpt.close()
            print(f"stage {cfg.stage}: already trained ({start} of {cfg.steps} steps in {ckpt.directory}); nothing to do")
            self.final_state = state
            return EXIT_OK

        peak, peak_source = peak_flops_per_device(cfg.log.peak_flops)
        logger = MetricsLogger(
            cfg.run_dir, self.data.task_names, flops_per_step=self.flops_per_step, peak_flops=peak,
            total_steps=cfg.steps, start_step=start, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl,
            progress=cfg.log.progress,
        )
        logger.message(
            f"{'resumed from step ' + str(start) if latest is not None else 'starting'} stage {cfg.stage}: "
            f"{self.num_params / 1e6:.2f}M parameters ({self.num_trainable / 1e6:.2f}M trainable), "
            f"mesh {dict(self.mesh.shape)}, {jax.process_count()} process(es), "
            f"{self.flops_per_step / 1e9:.2f} GFLOP/step (XLA), peak {peak / 1e9:.1f} GFLOP/s/device ({peak_source})"
        )
        evaluator = self._evaluator()

        stop = {"signal": None}
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            stop["signal"] = signum  # finish the running step, save, exit 0

        if _in_main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)

        # The whole config rides along, so `hellochat export` can rebuild the model from a step.
        meta = {"mesh": dict(self.mesh.shape), "tasks": list(self.data.task_names), "config": dataclasses.asdict(cfg)}
        pending = None  # (step, device metrics, data wait): read one step late so dispatch overlaps compute
        exit_code = EXIT_OK
        last_time = time.perf_counter()
        step = start
        try:
            with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
                while step < cfg.steps:
                    t0 = time.perf_counter()
                    micro = [next(iterator) for _ in range(cfg.optim.grad_accum)]
                    data_wait = time.perf_counter() - t0
                    state, metrics = self.step_fn(state, self.batch(micro))
                    step += 1
                    if pending is not None:
                        exit_code = self._log(logger, pending)
                    now = time.perf_counter()
                    pending, last_time = (step, metrics, data_wait, now - last_time), now
                    if exit_code != EXIT_OK:
                        break
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        ckpt.save(step, state, iterator, meta)
                    if evaluator and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                        logger.write({"step": step, **evaluator(self.model(state))})
                        last_time = time.perf_counter()  # evaluation time is not step time
                    if stop["signal"] is not None:
                        logger.message(f"SIGTERM: stopping after step {step}")
                        break
                if pending is not None and exit_code == EXIT_OK:
                    exit_code = self._log(logger, pending)
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, iterator, meta)
                ckpt.wait()
                if exit_code == EXIT_BAD_STEPS:
                    logger.message(
                        f"stopped: {cfg.max_bad_steps} consecutive steps had a non-finite loss or gradient "
                        f"(their updates were skipped); the checkpoint at step {step} in {ckpt.directory} holds "
                        f"the last good parameters. Check the data and the learning rate."
                    )
                elif stop["signal"] is None and evaluator and cfg.eval.at_end:
                    final = {"step": step, **evaluator(self.model(state))}
                    logger.write(final)
                    self.summary = _summary(final)
        finally:
            ckpt.close()
            logger.close()
            if _in_main_thread():
                signal.signal(signal.SIGTERM, previous)
        self.final_state = state
        if exit_code == EXIT_OK and cfg.log.plot and jax.process_index() == 0 and cfg.log.jsonl:
            from hellochat_jax.train.metrics import plot_curves

            plot_curves(cfg.run_dir)
        return exit_code

    def _log(self, logger: MetricsLogger, pending) -> int:
        step, metrics, data_wait, step_time = pending
        stats = jax.device_get(metrics)
        logger.observe(stats)
        if self.cfg.log.every and (step % self.cfg.log.every == 0 or not bool(stats["finite"])):
            logger.write(logger.train_record(step, stats, step_time=step_time, data_wait=data_wait,
                                             stage_record=self.objective.record))
        if int(stats["bad_in_row"]) >= self.cfg.max_bad_steps:
            return EXIT_BAD_STEPS
        return EXIT_OK

    def _evaluator(self):
        make = getattr(self.data, "evaluator", None)
        if make is None or not (self.cfg.eval.every or self.cfg.eval.at_end):
            return None
        return make(self)


def _summary(record: dict[str, Any]) -> str:
    """The final held-out numbers, one per line, for the console."""
    lines = [f"held-out evaluation at step {record['step']}:"]
    for key, value in record.items():
        if key.startswith("eval/") and isinstance(value, float):
            lines.append(f"  {key.removeprefix('eval/'):24s} {value:.3f}")
    return "\n".join(lines)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
