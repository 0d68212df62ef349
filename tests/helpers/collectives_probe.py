"""Run under a launcher (2 ranks): every collective of `Strategy` while torch's default device is `meta`.

A tensor the package makes without naming the process group's device lands on `meta` and holds no data, so
the call fails or returns nothing usable; this passes only if every collective takes its tensors on the group's
device. argv: MODEL_DIR TEMPLATE_JSON OUT_PREFIX; each rank writes OUT_PREFIX.rankR.json with what each call
returned (the caller's tensors are made on the real device before `meta` becomes the default, as the trainer's are).
"""
import json
import sys
from pathlib import Path

import torch


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, template_path, out_prefix = args
    from ds_distill.engines import OptimizerSpec, Strategy, init_distributed, train_ds_config
    from ds_distill.methods.distribution_matching.ema import PartitionedEMA
    from ds_distill.models.wan import WanFamily

    dist = init_distributed()
    strategy = Strategy(dist)
    template = json.loads(Path(template_path).read_text())
    # Some parameters stay whole (persistent), the rest are partitioned: both branches of the EMA swap run.
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    cfg = train_ds_config(template, micro_batch=1, grad_accum=1, world_size=dist.world_size, precision="bf16",
                          max_grad_norm=0.0)
    family = WanFamily()
    comps = family.components(model_dir, "<test>", "path")
    module = family.load_transformer(comps, strategy, cfg)
    spec = OptimizerSpec(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, max_grad_norm=0.0,
                         lr_scheduler="constant", warmup_steps=0, total_steps=10)
    engine = strategy.init_trainable(module, cfg, spec)
    tc = comps.transformer_config
    g = torch.Generator().manual_seed(dist.rank)
    out = engine(hidden_states=torch.randn(1, tc["in_channels"], 2, 8, 8, generator=g).bfloat16(),
                 timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(1, 8, tc["text_dim"], generator=g).bfloat16(), return_dict=False)[0]
    engine.backward(out.float().pow(2).mean())
    ema = PartitionedEMA(module, 0.5, strategy)
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in module.parameters())

    finite = torch.ones(3, device=dist.device)
    nan_on_rank1 = torch.tensor([1.0, float("nan") if dist.rank == 1 else 2.0], device=dist.device)
    scalars = torch.tensor([dist.rank + 1.0, 2.0], dtype=torch.float64)  # as trainer.log makes them
    to_broadcast = torch.full((4,), float(dist.rank))
    opt = engine.optimizer
    res = {"persistent": persistent, "partitioned": sum(1 for _ in module.parameters()) - persistent}

    torch.set_default_device("meta")
    try:
        res["all_finite(finite)"] = strategy.all_finite(finite)
        res["all_finite(nan on rank 1)"] = strategy.all_finite(nan_on_rank1)
        res["grads_finite"] = strategy.grads_finite(engine)
        flat, opt.grad_partitions_flat_buffer = opt.grad_partitions_flat_buffer, None  # the per-parameter path
        res["grads_finite(per parameter)"] = strategy.grads_finite(engine)
        opt.grad_partitions_flat_buffer = flat
        mean = strategy.all_reduce_mean(scalars)
        res["all_reduce_mean"] = [mean.tolist(), str(mean.dtype), str(mean.device)]
        strategy.broadcast_tensors([to_broadcast])
        res["broadcast_tensors"] = to_broadcast.tolist()
        with ema.swapped_in():
            res["ema_swap"] = True
        res["broadcast_object"] = strategy.broadcast_object({"rank": dist.rank})
        res["gather_object"] = strategy.gather_object(dist.rank)
        strategy.barrier()
        if dist.rank == 1:
            strategy.corrupt_grads(engine)
        res["grads_finite(corrupt on rank 1)"] = strategy.grads_finite(engine)
        flat, opt.grad_partitions_flat_buffer = opt.grad_partitions_flat_buffer, None
        res["grads_finite(per parameter, corrupt on rank 1)"] = strategy.grads_finite(engine)
        opt.grad_partitions_flat_buffer = flat
    finally:
        torch.set_default_device("cpu")
    Path(f"{out_prefix}.rank{dist.rank}.json").write_text(json.dumps(res))
    strategy.close()


if __name__ == "__main__":
    main()
