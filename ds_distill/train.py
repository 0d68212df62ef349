"""The one training entry: `python -m ds_distill.train --config RECIPE.yaml [key.sub=value ...]`.

Works as a plain single process, under `torchrun`, and under `deepspeed [--hostfile H] --module ds_distill.train`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ds_distill.errors import RecipeError, UserError, exit_on_user_error

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


def check_output_dir(path: Path, source: str) -> None:
    """The output folder must be creatable and writable before anything heavy starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"{source}: training.output_dir: {path} is not writable ({exc.strerror})") from None


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
    from ds_distill.utils.dataloader import ParquetDataset

    args = parse_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.config, args.overrides)
    checked = check_recipe(recipe)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0

    # Preflight: everything a user can get wrong is found before any engine is built.
    for name, spec in recipe.roles.items():
        from ds_distill.dispatch import get_family

        get_family(spec.family, recipe.source)().components(spec.path, recipe.source, f"roles.{name}.path")
    if recipe.training.log_validation:
        from ds_distill.utils.config import resolve_path
        from ds_distill.validators.prompts import load_prompts

        load_prompts(resolve_path(recipe.training.validation_dataset_file, recipe))
    need_latents = checked.method_cls.needs_latents(checked.method_config)
    dataset = ParquetDataset(recipe.training.data_path, recipe.training.text_len, need_latents)
    output_dir = Path(recipe.training.output_dir)
    check_output_dir(output_dir, recipe.source)

    from ds_distill.engines import Strategy, init_distributed

    dist = init_distributed(args.local_rank)
    setup_logging(dist.rank)
    strategy = Strategy(dist)
    if dist.is_main:
        (output_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    runtime = build_runtime(checked, strategy)
    validator = None
    if recipe.training.log_validation:
        validator = runtime.family.build_validator(
            runtime.components[runtime.method.validation_role().name], recipe, strategy, None
        )
    from ds_distill.trainer import Trainer

    trainer = Trainer(runtime, dataset, validator)
    trainer.resume(args.resume)
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
