"""The one training entry: `python -m ds_distill.train --config RECIPE.yaml [key.sub=value ...]`.

Works as a plain single process, under `torchrun`, and under `deepspeed [--hostfile H] --module ds_distill.train`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ds_distill.errors import UserError, exit_on_user_error

logger = logging.getLogger("ds_distill")


def build_parser() -> argparse.ArgumentParser:
    from ds_distill.cli import ArgumentParser  # argparse whose mistakes are one-line UserErrors

    p = ArgumentParser(
        prog="python -m ds_distill.train",
        description="Train (finetune or distill) a video diffusion transformer from a schema-v2 recipe.",
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, help="recipe YAML (schema v2)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_train_steps=10")
    p.add_argument("--resume", default=None, help="`latest` or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and build roles, engines and data, then exit; writes nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds an earlier run: move it aside (to a sibling name, printed) and start anew")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="[%(asctime)s] [rank %(rank)s] %(message)s", datefmt="%H:%M:%S")
    old = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)
    logger.setLevel(level)


def parse_args(argv):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-")]
    if stray:
        raise UserError(f"unknown option {stray[0]!r} (see python -m ds_distill.train --help)")
    args.overrides = list(args.overrides) + unknown
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from ds_distill.trainer import Preemption

    started = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume exclude each other: --resume continues the run in output_dir, "
                        "--overwrite moves it aside and starts a new one")
    # Until training starts a signal ends the run at once (nothing to save); from then on it is deferred to the
    # end of the step and answered with a checkpoint.
    preemption = Preemption(grace_s=120.0)
    preemption.install()
    try:
        return run(args, preemption, started)
    finally:
        preemption.uninstall()


def run(args, preemption, started: float) -> int:
    from ds_distill.dispatch import check_recipe
    from ds_distill.utils import checkpoint as ckpt
    from ds_distill.utils.config import dump_recipe, load_recipe

    recipe = load_recipe(args.config, args.overrides)
    checked = check_recipe(recipe)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0
    t = recipe.training
    preemption.grace_s = t.preemption_grace_s
    world_size_matches(recipe)

    # Check first, write second: everything a user can get wrong is found before the output folder is touched.
    from ds_distill import preflight

    found = preflight.run(recipe, checked, args.resume, args.overwrite)
    output_dir = Path(t.output_dir)
    if found.resume_state is not None and int(found.resume_state["step"]) >= t.max_train_steps:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops here, before any process group
            print(f"{found.resume_path} is at step {found.resume_state['step']} and training.max_train_steps is "
                  f"{t.max_train_steps}: nothing to train (raise training.max_train_steps to continue)", flush=True)
        return 0

    from ds_distill.engines import Strategy, init_distributed

    dist = init_distributed(args.local_rank)
    setup_logging(dist.rank)
    strategy = Strategy(dist)
    lock = None
    try:
        if not args.dry_run:
            lock = take_ownership(output_dir, args.overwrite, strategy)
            preemption.on_force_exit = lambda: ckpt.release_lock(lock)
        code = train_with(args, recipe, checked, found, strategy, preemption, started)
    finally:
        ckpt.release_lock(lock)
    return code


def world_size_matches(recipe) -> None:
    """`training.num_gpus` against the launcher's world size, before anything is loaded or written; rank 0 says
    it in one line, the other ranks exit quietly with the same code."""
    from ds_distill.utils.config import check_world_size

    try:
        check_world_size(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:
            sys.exit(2)
        raise


def take_ownership(output_dir: Path, overwrite: bool, strategy) -> Path | None:
    """Rank 0 locks the run folder (moving an earlier run aside under --overwrite) before anything is written;
    every rank learns the verdict, so a refusal ends all of them with one line from rank 0."""
    from ds_distill.errors import CheckpointError
    from ds_distill.utils import checkpoint as ckpt

    dist = strategy.dist
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = ckpt.acquire_lock(output_dir)
            if overwrite and ckpt.run_contents(output_dir):
                moved, lock = ckpt.move_aside(output_dir, lock)
                print(f"--overwrite: moved the earlier run in {output_dir} to {moved}", flush=True)
        except UserError as exc:
            refusal = str(exc)
    if dist.world_size > 1:
        refusal = strategy.broadcast_object(refusal)
    if refusal is not None:
        if dist.is_main:
            raise CheckpointError(refusal)
        sys.exit(2)  # rank 0 says why
    return lock


def train_with(args, recipe, checked, found, strategy, preemption, started: float) -> int:
    """Build engines, restore the checkpoint, train; returns the exit code."""
    from ds_distill.dispatch import build_runtime
    from ds_distill.utils.checkpoint import write_text_atomic
    from ds_distill.utils.config import dump_recipe

    dist = strategy.dist
    output_dir = Path(recipe.training.output_dir)
    load_dir = found.resume_path
    universal = bool(found.resume_state) and int(found.resume_state.get("world_size", dist.world_size)) != \
        dist.world_size
    if universal and not args.dry_run:
        # Written by another number of ranks: go through DeepSpeed's universal checkpoint (converted once, kept
        # beside the original, which stays untouched).
        old = int(found.resume_state["world_size"])
        load_dir = output_dir / f".universal-{found.resume_path.name}-from-{old}-ranks"
        if dist.is_main:
            logger.info("%s was written by %d ranks, this run has %d: converting to a universal checkpoint in %s",
                        found.resume_path, old, dist.world_size, load_dir)
        for name, spec in recipe.roles.items():
            if spec.trainable:
                strategy.to_universal(found.resume_path / name, load_dir / name)
    runtime = build_runtime(checked, strategy, load_universal=universal and not args.dry_run)
    validator = None
    if recipe.training.log_validation:
        validator = runtime.family.build_validator(
            runtime.components[runtime.method.validation_role().name], recipe, strategy, None
        )
    from ds_distill.trainer import Trainer

    trainer = Trainer(runtime, found.dataset, validator)
    trainer.preemption = preemption
    if args.resume and found.resume_path is None and dist.is_main:
        logger.warning("--resume %s: no complete checkpoint in %s; starting from step 0", args.resume, output_dir)
    if args.dry_run:
        if universal:
            print(f"dry run: {found.resume_path} was written by another number of ranks; the real run converts "
                  f"it (checked, not loaded here)")
        else:
            trainer.resume(found.resume_path, found.resume_state, load_dir)
        if dist.is_main:
            print(trainer.banner())
            print("dry run: recipe, roles, engines and data are ready; nothing was written; exiting before training")
        strategy.close()
        return 0
    trainer.start_tracker()  # a wandb login or network problem stops the run before anything is written
    trainer.resume(found.resume_path, found.resume_state, load_dir)
    if dist.is_main:
        write_text_atomic(output_dir / "recipe.yaml", dump_recipe(recipe))
        total = time.perf_counter() - started
        logger.info("start-up: preflight %.2f s of %.2f s before the first step (%.1f%%; imports the run needs "
                    "anyway, done before the checks: %.2f s)", found.seconds, total,
                    100 * found.seconds / total if total > 0 else 0.0, found.import_seconds)
    trainer.train()
    if trainer.stopped_by is not None:
        code = preemption.CODES[trainer.stopped_by]
        if dist.is_main:
            import signal

            print(f"stopped by {signal.Signals(trainer.stopped_by).name} after step {trainer.step}; checkpoint: "
                  f"{trainer.last_checkpoint}; to continue, run the same command with --resume latest",
                  file=sys.stderr, flush=True)
        strategy.close()
        return code
    strategy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
