"""The one training entry: `python -m ds_distill.train --config RECIPE.yaml [key.sub=value ...]`.

Works as a plain single process, under `torchrun`, and under `deepspeed [--hostfile H] --module ds_distill.train`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ds_distill.errors import UserError, exit_on_user_error

logger = logging.getLogger("ds_distill")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ds_distill.train",
        description="Train (finetune or distill) a video diffusion transformer from a schema-v2 recipe.",
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, help="recipe YAML (schema v2)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_train_steps=10")
    p.add_argument("--resume", default=None, help="`latest` or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="build config, roles, engines and data, then exit")
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
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.utils.config import dump_recipe, load_recipe

    args = parse_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.config, args.overrides)
    checked = check_recipe(recipe)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0

    # Preflight: everything a user can get wrong is found before any engine is built.
    from ds_distill import preflight

    found = preflight.run(recipe, checked, args.resume)
    output_dir = Path(recipe.training.output_dir)

    from ds_distill.engines import Strategy, init_distributed

    dist = init_distributed(args.local_rank)
    setup_logging(dist.rank)
    strategy = Strategy(dist)
    if dist.is_main:
        from ds_distill.utils.checkpoint import write_text_atomic

        write_text_atomic(output_dir / "recipe.yaml", dump_recipe(recipe))
    load_dir = found.resume_path
    universal = bool(found.resume_state) and int(found.resume_state.get("world_size", dist.world_size)) != \
        dist.world_size
    if universal:
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
    runtime = build_runtime(checked, strategy, load_universal=universal)
    validator = None
    if recipe.training.log_validation:
        validator = runtime.family.build_validator(
            runtime.components[runtime.method.validation_role().name], recipe, strategy, None
        )
    from ds_distill.trainer import Trainer

    trainer = Trainer(runtime, found.dataset, validator)
    if args.resume and found.resume_path is None and dist.is_main:
        logger.warning("--resume %s: no complete checkpoint in %s; starting from step 0", args.resume, output_dir)
    trainer.resume(found.resume_path, found.resume_state, load_dir)
    if args.dry_run:
        if dist.is_main:
            print(trainer.banner())
            print("dry run: recipe, roles, engines and data are ready; exiting before training")
        strategy.close()
        return 0
    trainer.train()
    strategy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
