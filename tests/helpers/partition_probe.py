"""Run under a launcher: build the recipe's runtime and write each rank's partition sizes as JSON."""
import json
import sys

from ds_distill.dispatch import build_runtime, check_recipe
from ds_distill.engines import Strategy, init_distributed
from ds_distill.utils.config import load_recipe


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    recipe_path, out_prefix = args[0], args[1]
    dist = init_distributed()
    runtime = build_runtime(check_recipe(load_recipe(recipe_path)), Strategy(dist))
    report = {}
    for role in runtime.bundle:
        report[role.name] = {
            n: [int(p.ds_numel), int(p.ds_tensor.numel()), bool(getattr(p, "ds_persist", False))]
            for n, p in role.module.named_parameters()
        }
        report[role.name]["__optimizer__"] = role.engine.optimizer is not None and role.trainable
    with open(f"{out_prefix}.rank{dist.rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
