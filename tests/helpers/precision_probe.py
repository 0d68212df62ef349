"""Run under a launcher (2 ranks): a frozen (teacher) and a trainable (student) Wan role built as ds_distill builds
them -- zero.Init, bf16, stage3_param_persistence_threshold 0, ZeRO-3 leaf blocks -- against diffusers' own
`from_pretrained(torch_dtype=bfloat16)` on the same input, through the adapter's predict_noise / predict_x0.

argv: MODEL_DIR TEMPLATE_TRAIN TEMPLATE_INFERENCE OUT_PREFIX; each rank writes OUT_PREFIX.rankR.json.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, train_template, inference_template, out_prefix = args
    torch_linear = F.linear
    from diffusers import WanTransformer3DModel

    from ds_distill.adapters.wan import WanAdapter
    from ds_distill.engines import OptimizerSpec, Strategy, eval_ds_config, init_distributed, train_ds_config
    from ds_distill.models.wan import WanFamily
    from ds_distill.roles import RoleHandle

    dist = init_distributed()
    strategy = Strategy(dist)
    family = WanFamily()
    comps = family.components(model_dir, "<test>", "path")
    world = dist.world_size

    def template(path):
        t = json.loads(Path(path).read_text())
        t["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return t

    frozen_cfg = eval_ds_config(template(inference_template), micro_batch=1, world_size=world, precision="bf16",
                                offload="none", nvme_path=None)
    train_cfg = train_ds_config(template(train_template), micro_batch=1, grad_accum=1, world_size=world,
                                precision="bf16", max_grad_norm=0.0)
    teacher = family.load_transformer(comps, strategy, frozen_cfg, trainable=False)
    strategy.mark_leaf_modules(teacher, family.zero3_leaf_modules)
    teacher_engine = strategy.init_frozen(teacher, frozen_cfg)
    student = family.load_transformer(comps, strategy, train_cfg, trainable=True)
    strategy.mark_leaf_modules(student, family.zero3_leaf_modules)
    student.enable_gradient_checkpointing()
    spec = OptimizerSpec(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, max_grad_norm=0.0,
                         lr_scheduler="constant", warmup_steps=0, total_steps=1)
    student_engine = strategy.init_trainable(student, train_cfg, spec)

    training = SimpleNamespace(mixed_precision="bf16", text_len=16, num_frames=9, height=16, width=16)
    adapter = WanAdapter(comps, SimpleNamespace(flow_shift=3.0), training, dist.device)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([937.5, 120.25])
    cond = torch.randn(2, 16, comps.transformer_config["text_dim"], generator=g)
    roles = {"teacher": RoleHandle("teacher", teacher, False, teacher_engine),
             "student": RoleHandle("student", student, True, student_engine)}
    out = {}
    for name, role in roles.items():
        with torch.no_grad():
            out[name] = (adapter.predict_noise(role, x_t, t, cond).cpu(), adapter.predict_x0(role, x_t, t, cond).cpu())
    params = dict(teacher.named_parameters())
    report = {
        "torch_linear_untouched": F.linear is torch_linear,
        "local_numel": {n: int(p.ds_tensor.numel()) for n, p in params.items()},
        "full_numel": {n: int(p.ds_numel) for n, p in params.items()},
        "gathered_outside_forward": [n for n, p in params.items() if p.data.numel()],
        "teacher_fp32": sorted(n for n, p in params.items() if p.ds_tensor.dtype == torch.float32),
        "student_dtypes": sorted({str(p.ds_tensor.dtype) for p in student.parameters()}),
    }
    if dist.rank == 0:
        ref = WanTransformer3DModel.from_pretrained(str(Path(model_dir) / "transformer"), torch_dtype=torch.bfloat16)
        ref_role = RoleHandle("reference", ref, False)
        with torch.no_grad():
            v_ref, x0_ref = adapter.predict_noise(ref_role, x_t, t, cond), adapter.predict_x0(ref_role, x_t, t, cond)
        report["reference_fp32"] = sorted(n for n, p in ref.named_parameters() if p.dtype == torch.float32)
        report["scale"] = float(v_ref.abs().max())
        for name, (v, x0) in out.items():
            report[f"{name}_v_max"] = float((v - v_ref).abs().max())
            report[f"{name}_x0_max"] = float((x0 - x0_ref).abs().max())
            report[f"{name}_v_rel"] = float((v - v_ref).norm() / v_ref.norm())
    Path(f"{out_prefix}.rank{dist.rank}.json").write_text(json.dumps(report))
    strategy.close()


if __name__ == "__main__":
    main()
