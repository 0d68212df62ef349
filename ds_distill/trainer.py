"""The training loop: data, steps, logging, validation cadence and checkpoints. Methods own only the step."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ds_distill.dispatch import Runtime
from ds_distill.utils import checkpoint as ckpt
from ds_distill.utils import faults
from ds_distill.utils.dataloader import ParquetDataset, TrainLoader
from ds_distill.utils.tracking import Tracker

logger = logging.getLogger("ds_distill")


def count_params(module: torch.nn.Module) -> int:
    """Full parameter count, also for ZeRO-3 partitioned modules."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


class Preemption:
    """SIGTERM / SIGINT handling. Before training (`deferred=False`) a signal ends the run at once: there is
    nothing to save. During training it is only noted; after each step the ranks agree (one all-reduce) whether
    any of them got one, and all stop at that same step, save and exit 143 / 130. A grace timer, started at the
    first signal (or when a rank learns of it), caps that: past `grace_s` the process exits without finishing the
    save, which leaves the last complete checkpoint in charge. A second Ctrl-C exits at once."""

    CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self, grace_s: float, on_force_exit: Callable[[], None] | None = None):
        self.grace_s = grace_s
        self.on_force_exit = on_force_exit
        self.received: int | None = None
        self.deferred = False
        self.timer: threading.Timer | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.CODES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}
        if self.timer is not None:
            self.timer.cancel()

    @staticmethod
    def _say(text: str) -> None:
        os.write(2, (text + "\n").encode())  # safe inside a signal handler, unlike print

    def _handle(self, signum: int, frame) -> None:
        from ds_distill.errors import Interrupted

        if not self.deferred:
            raise Interrupted(signum)
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT == self.received:
                self.force(f"second {name}: exiting now without finishing the checkpoint", self.CODES[signum])
            return
        self.received = signum
        self._say(f"received {name}: finishing this step, then saving a checkpoint (at most "
                  f"{self.grace_s:g} s, training.preemption_grace_s)")
        self.start_timer(signum)

    def start_timer(self, signum: int) -> None:
        if self.timer is None:
            code = self.CODES[signum]
            self.timer = threading.Timer(self.grace_s, self.force, args=(
                f"training.preemption_grace_s ({self.grace_s:g} s) ran out before the checkpoint was complete; "
                f"exiting (the last complete checkpoint is still in charge)", code))
            self.timer.daemon = True
            self.timer.start()

    def force(self, message: str, code: int) -> None:
        self._say(message)
        if self.on_force_exit is not None:
            self.on_force_exit()
        os._exit(code)

    def agreed(self, strategy) -> int | None:
        """The signal every rank acts on after this step (SIGTERM wins over SIGINT), or None: one all-reduce."""
        if strategy.dist.world_size == 1:
            return self.received
        flags = torch.tensor([float(self.received == signal.SIGTERM), float(self.received == signal.SIGINT)],
                             dtype=torch.float64)
        term, intr = strategy.all_reduce_mean(flags).tolist()
        signum = signal.SIGTERM if term > 0 else signal.SIGINT if intr > 0 else None
        if signum is not None:
            self.start_timer(signum)
        return signum


class Trainer:
    """Runs a method's steps from a (possibly resumed) position to `max_train_steps`."""

    def __init__(self, runtime: Runtime, dataset: ParquetDataset, validator=None):
        self.rt = runtime
        self.t = runtime.recipe.training
        self.strategy = runtime.strategy
        self.dist = runtime.strategy.dist
        self.method = runtime.method
        self.dataset = dataset
        self.validator = validator
        self.output_dir = Path(self.t.output_dir)
        self.tracker = Tracker.for_run(runtime.recipe, self.dist.is_main)
        if validator is not None:
            validator.tracker = self.tracker
        self.step = 0
        self.micro_step = 0
        self.nonfinite_streak = 0
        self.sp = runtime.sp if runtime.sp is not None else runtime.strategy.sp
        """Sequence-parallel layout: the ranks of one SP group share samples; data is sharded over its dp ranks."""
        self.global_micro_batch = self.t.train_batch_size * self.sp.dp_size
        self.resumed_from: Path | None = None
        self.preemption = Preemption(self.t.preemption_grace_s)
        self.stopped_by: int | None = None
        """The signal that stopped training early (SIGTERM / SIGINT), None when it ran to the end."""
        self.last_checkpoint: Path | None = None

    # -- start-up ---------------------------------------------------------------------------------
    def banner(self) -> str:
        t, d = self.t, self.dist
        lines = [f"ds_distill: {self.rt.recipe.recipe.method} on {self.rt.recipe.recipe.family} "
                 f"({d.world_size} rank{'s' if d.world_size > 1 else ''}, {d.device.type}, {t.mixed_precision})"]
        for role in self.rt.bundle:
            kind = "trainable, ZeRO-3 + optimizer" if role.trainable else "frozen, ZeRO-inference"
            lines.append(f"  {role.name:<8} {count_params(role.module) / 1e6:9.3f} M params  {kind}  "
                         f"<- {self.rt.recipe.roles[role.name].path}")
        dp = self.sp.dp_size
        g = t.train_batch_size * t.gradient_accumulation_steps * dp
        if self.sp.size > 1:
            lines.append(f"  sequence parallel: {self.sp.size} ranks per sample (DeepSpeed-Ulysses), {dp} "
                         f"data-parallel group{'s' if dp > 1 else ''}")
        lines.append(f"  batch: {t.train_batch_size} per {'rank' if self.sp.size == 1 else 'group'} x "
                     f"{t.gradient_accumulation_steps} accumulation x {dp} "
                     f"{'ranks' if self.sp.size == 1 else 'groups'} = {g} samples per step; {t.max_train_steps} steps "
                     f"= {g * t.max_train_steps} samples ({g * t.max_train_steps / len(self.dataset):.1f} epochs "
                     f"of {len(self.dataset)} rows)")
        lines.append(f"  output: {self.output_dir}")
        return "\n".join(lines)

    def resume(self, path: Path | None, state: dict | None, load_dir: Path | None = None) -> None:
        """Restore engines, method state and data position from a checkpoint preflight has checked.
        `load_dir` holds the engines' files when they were converted (universal checkpoint, other rank count)."""
        if path is None:
            return
        client = {}
        for role in self.rt.bundle.trainable():
            client = self.strategy.load(role.engine, load_dir or path, role.name)
        self.method.load_state_dict(client.get("method", {}))
        self.method.load_extra_checkpoint_files(lambda r: path / r)
        self.step = int(state["step"])
        # The data position counts global micro-batches; carry it over in samples when the global batch changed.
        old_global = int(state.get("global_micro_batch", self.global_micro_batch))
        consumed = int(state["micro_step"]) * old_global
        self.micro_step = consumed // self.global_micro_batch
        if consumed % self.global_micro_batch and self.dist.is_main:
            logger.warning("the global batch changed from %d to %d: resuming at sample %d of the data order "
                           "(not a whole batch)", old_global, self.global_micro_batch, self.micro_step *
                           self.global_micro_batch)
        if "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"])
        self.resumed_from = path
        if self.dist.is_main:
            logger.info("resumed from %s (step %d)", path, self.step)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: every rank writes its partitions; rank 0 seals the folder."""
        tmp = ckpt.begin_save(self.output_dir, self.step, self.dist.is_main)
        self.strategy.barrier()
        client = {"step": self.step, "micro_step": self.micro_step, "method": self.method.state_dict(),
                  "torch_rng": torch.get_rng_state()}
        for role in self.rt.bundle.trainable():
            (tmp / role.name).mkdir(exist_ok=True)
            self.strategy.save(role.engine, tmp, role.name, client)
        self.method.extra_checkpoint_files(lambda r: tmp / r)
        self.strategy.barrier()
        faults.maybe_kill("mid_save", self.step)
        final = ckpt.checkpoint_dir(self.output_dir, self.step)
        if self.dist.is_main:
            state = {"step": self.step, "micro_step": self.micro_step, "world_size": self.dist.world_size,
                     "global_micro_batch": self.global_micro_batch,
                     "roles": [r.name for r in self.rt.bundle.trainable()],
                     "method": self.rt.recipe.recipe.method, "family": self.rt.recipe.recipe.family}
            final = ckpt.commit_save(self.output_dir, self.step, state, self.t.checkpoints_total_limit,
                                     protect=self.resumed_from)
        # The checkpoint we resumed from is kept through the first save after it; from then on a newer
        # complete checkpoint exists and ordinary rotation applies.
        self.resumed_from = None
        self.strategy.barrier()
        self.last_checkpoint = final
        return final

    # -- the loop ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.validator is not None:
            # Validation spreads prompts over ranks: each rank renders its own whole sequences.
            with self.sp.paused():
                self.validator.run(self.method, self.step)

    def train(self) -> dict:
        """Run to max_train_steps (or to the step where a SIGTERM/SIGINT arrived: then `stopped_by` is set and a
        checkpoint of that step exists); returns the last logged scalars."""
        t, d = self.t, self.dist
        if d.is_main:
            ckpt.clean_stale_tmp(self.output_dir)
            # Metrics (and TensorBoard events) past the resumed step belong to a run that was cut short.
            self.truncate_metrics(self.step)
            self.tracker.purge_step = self.step + 1 if self.step else None
            print(self.banner(), flush=True)
        loader = TrainLoader(self.dataset, t.train_batch_size, self.sp.dp_rank, self.sp.dp_size, t.seed,
                             num_workers=t.dataloader_num_workers, start_micro_step=self.micro_step)
        self.preemption.deferred = True
        try:
            return self._loop(loader)
        finally:
            loader.close()
            self.tracker.close()

    def start_tracker(self) -> None:
        """Rank 0 starts the trackers (wandb logs in now, not at the first scalar); when one cannot start, every
        rank stops: one line from rank 0, exit 2 on all. The training entry calls it before writing anything."""
        reason = self.tracker.start() if self.dist.is_main else None
        if self.dist.world_size > 1:
            reason = self.strategy.broadcast_object(reason)
        if reason is not None:
            if self.dist.is_main:
                from ds_distill.errors import UserError

                raise UserError(reason)
            raise SystemExit(2)

    def _loop(self, loader: TrainLoader) -> dict:
        t, d = self.t, self.dist
        if t.log_validation and self.step == 0:
            self.validate()
        bar = None
        if d.is_main:
            from tqdm import tqdm

            bar = tqdm(total=t.max_train_steps, initial=self.step, desc="train", dynamic_ncols=True,
                       disable=os.environ.get("DS_DISTILL_NO_TQDM") == "1")
        last: dict = {}
        samples_per_step = t.train_batch_size * t.gradient_accumulation_steps * self.sp.dp_size
        while self.step < t.max_train_steps:
            started = time.perf_counter()
            micro = [next(loader) for _ in range(t.gradient_accumulation_steps)]
            self.step += 1
            self.micro_step = loader.micro_step
            scalars = self.method.train_one_step(micro, self.step)
            self.check_nonfinite(scalars)
            elapsed = time.perf_counter() - started
            if self.step % t.log_steps == 0 or self.step == t.max_train_steps:
                last = self.log(scalars, elapsed, samples_per_step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k.endswith("/loss")}, refresh=False)
            if bar is not None:
                bar.update(1)
            if t.log_validation and t.validation_steps and self.step % t.validation_steps == 0:
                self.validate()
            saved = (t.checkpointing_steps and self.step % t.checkpointing_steps == 0) or \
                self.step == t.max_train_steps
            if saved:
                self.save()
            faults.maybe_kill("after_step", self.step)
            faults.maybe_signal(self.step, d.rank)
            signum = self.preemption.agreed(self.strategy)
            if signum is not None and self.step < t.max_train_steps:
                if not saved:
                    self.save()
                self.stopped_by = signum
                break
        if bar is not None:
            bar.close()
        return last

    def check_nonfinite(self, scalars: dict[str, float]) -> None:
        """Apply the recipe's non-finite policy to what the method skipped this step (same on every rank)."""
        skipped, self.method.skipped = self.method.skipped, []
        scalars["nonfinite/skipped"] = float(len(skipped))
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        if self.dist.is_main:
            logger.warning("step %d: non-finite %s; that update was skipped (weights unchanged)", self.step,
                           ", ".join(skipped))
        t = self.t
        if t.nonfinite_policy == "abort" and self.nonfinite_streak >= t.nonfinite_patience:
            from ds_distill.errors import TrainingAborted

            last = ckpt.list_checkpoints(self.output_dir)
            where = f"; last checkpoint: {last[-1][1]}" if last else ""
            raise TrainingAborted(
                f"training.nonfinite_policy: abort: {self.nonfinite_streak} steps in a row with a non-finite "
                f"{', '.join(skipped)} (up to step {self.step}){where}; lower the learning rate or use "
                f"nonfinite_policy: skip")

    def log(self, scalars: dict[str, float], elapsed: float, samples: int) -> dict[str, float]:
        """Average the method's scalars over ranks and add lr / grad norm of roles that stepped."""
        keys = sorted(scalars)
        values = torch.tensor([scalars[k] for k in keys], dtype=torch.float64)
        if self.dist.world_size > 1:
            values = self.strategy.all_reduce_mean(values)
        out = {k: float(v) for k, v in zip(keys, values)}
        for role in self.rt.bundle.trainable():
            if f"{role.name}/loss" in out:
                out[f"{role.name}/lr"] = self.strategy.lr(role.engine)
                out[f"{role.name}/grad_norm"] = self.strategy.grad_norm(role.engine)
        out["perf/step_time_s"] = elapsed
        out["perf/samples_per_s"] = samples / elapsed if elapsed > 0 else math.nan
        if self.dist.is_main:
            self.tracker.log_scalars(out, self.step)
            self.write_jsonl(out)
        return out

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl lines past the resumed step (they belong to the run that died)."""
        import json

        path = self.output_dir / "metrics.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            ckpt.write_text_atomic(path, "".join(ln + "\n" for ln in keep))

    def write_jsonl(self, values: dict[str, float]) -> None:
        """Append the step's scalars to output_dir/metrics.jsonl (easy to read back in tests and notebooks)."""
        import json

        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")
