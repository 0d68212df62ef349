"""Run under a launcher: bf16 ZeRO-3 training of the tiny Wan with a student EMA, checked against references.

argv: MODEL_DIR TEMPLATE_JSON PERSISTENCE_THRESHOLD OUT_DIR. Rank 0 writes OUT_DIR/report.json with
- ema_vs_fp32_ref: max |EMA - independent fp32 EMA of the master weights| (from safe_get_full_fp32_param after
  every step), over all parameters, read back from the EMA's own checkpoint files;
- staircase_vs_fp32_ref: the same for an EMA of the bf16 weights (what averaging ds_tensor gives): the test's
  tolerance must be able to tell these apart;
- swapped_vs_plain: max |output inside ema.swapped_in() - output of a plain WanTransformer3DModel loaded with the
  EMA weights| (same input, same parameter dtypes), with the scale of the output;
- restored: the module's output after swapped_in() equals the one before, bit for bit;
- persistent / partitioned: how many parameters ZeRO-3 keeps whole vs partitioned.
"""
import json
import sys
from pathlib import Path

import torch


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, template_path, threshold, out_dir = args[0], args[1], float(args[2]), Path(args[3])
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_distill.engines import OptimizerSpec, Strategy, init_distributed, train_ds_config
    from ds_distill.methods.distribution_matching.ema import PartitionedEMA, whole_tensors
    from ds_distill.models.wan import WanFamily

    dist = init_distributed()
    strategy = Strategy(dist)
    template = json.loads(Path(template_path).read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    cfg = train_ds_config(template, micro_batch=2, grad_accum=1, world_size=dist.world_size, precision="bf16",
                          max_grad_norm=0.0)
    family = WanFamily()
    comps = family.components(model_dir, "<test>", "path")
    module = family.load_transformer(comps, strategy, cfg)
    spec = OptimizerSpec(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, max_grad_norm=0.0,
                         lr_scheduler="constant", warmup_steps=0, total_steps=100)
    engine = strategy.init_trainable(module, cfg, spec)
    tc = comps.transformer_config

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, tc["in_channels"], 2, 8, 8, generator=g)
        c = torch.randn(2, 8, tc["text_dim"], generator=g)
        t = torch.tensor([300.0, 800.0])
        return dict(hidden_states=x.to(dist.device, torch.bfloat16), timestep=t.to(dist.device),
                    encoder_hidden_states=c.to(dist.device, torch.bfloat16), return_dict=False)

    decay, start = 0.7, 2
    ema = PartitionedEMA(module, decay, strategy)
    params = dict(module.named_parameters())
    ref = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    stair = {n: r.bfloat16().float() for n, r in ref.items()}
    for step in range(6):
        out = engine(**inputs(100 * step + dist.rank))[0]
        engine.backward(out.float().pow(2).mean())
        engine.step()
        ema.update(step, start)
        for n, p in params.items():
            full = safe_get_full_fp32_param(p)
            if step < start:
                ref[n].copy_(full)
                stair[n].copy_(full.bfloat16().float())
            else:
                ref[n].lerp_(full, 1 - decay)
                stair[n].lerp_(full.bfloat16().float(), 1 - decay)

    ema.save(out_dir)
    strategy.barrier()
    probe = inputs(12345)
    module.eval()
    with torch.no_grad():
        live_before = module(**probe)[0].float().cpu()
        with ema.swapped_in():
            swapped = module(**probe)[0].float().cpu()
        live_after = module(**probe)[0].float().cpu()
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in params.values())
    dtypes = {n: p.dtype for n, p in params.items()}
    with strategy.gathered(list(params.values())):
        live = {n: p.data.detach().cpu().clone() for n, p in params.items()}
    strategy.barrier()
    if dist.rank == 0:
        import shutil

        from diffusers import WanTransformer3DModel
        from safetensors.torch import save_file

        whole = whole_tensors(sorted((out_dir / "ema").glob("rank-*.safetensors")))
        cpu_probe = {k: v.cpu() if torch.is_tensor(v) else v for k, v in probe.items()}

        def plain_output(weights: dict, name: str) -> torch.Tensor:
            """A plain model as users load one: a Diffusers folder read by from_pretrained(torch_dtype=bf16)."""
            folder = out_dir / name
            folder.mkdir()
            shutil.copy(Path(model_dir) / "transformer" / "config.json", folder / "config.json")
            save_file({n: t.contiguous() for n, t in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
            plain = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
            with torch.no_grad():
                return plain(**cpu_probe)[0].float()

        plain_out = plain_output(whole, "ema_model")
        plain_live = plain_output({n: t.float() for n, t in live.items()}, "live_model")
        whole_params = {n for n, p in params.items() if getattr(p, "ds_persist", False)}
        mixed = {n: (live[n].float() if n in whole_params else t) for n, t in whole.items()}
        plain_mixed = plain_output(mixed, "partitioned_only_model")
        report = {
            "names": sorted(whole) == sorted(ref),
            "ema_vs_fp32_ref": max(float((whole[n] - ref[n]).abs().max()) for n in ref),
            "staircase_vs_fp32_ref": max(float((stair[n] - ref[n]).abs().max()) for n in ref),
            "swapped_vs_plain": float((swapped - plain_out).abs().max()),
            "swapped_vs_live": float((swapped - live_before).abs().max()),
            "live_vs_plain_live": float((live_before - plain_live).abs().max()),
            "persistent_left_live_vs_plain": float((plain_mixed - plain_out).abs().max()),
            "output_scale": float(plain_out.abs().max()),
            "restored": bool(torch.equal(live_before, live_after)),
            "persistent": persistent,
            "partitioned": len(params) - persistent,
            "param_dtypes": sorted({str(d) for d in dtypes.values()}),
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    strategy.close()


if __name__ == "__main__":
    main()
