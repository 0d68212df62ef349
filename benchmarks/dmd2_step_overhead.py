"""One DMD2 iteration (student update + critic update) three ways, same three Wan-architecture models
(student, critic trainable; teacher frozen; each >= 20M params), in one run:

  plain    plain PyTorch: the DMD2 math written out, fused AdamW for student and critic, teacher in eval
  bare     bare DeepSpeed: two deepspeed.initialize engines (ZeRO-3) + a ZeRO-inference teacher engine,
           the same hand-written math
  ds       ds_distill: DMD2Method.train_one_step on the engines build_runtime makes from a recipe

Every way draws the same exit indices (same number of model calls per iteration); each runs in its own
process; both DeepSpeed ways use persistence threshold 0. Rounds and ratios as in step_overhead.py: median
iteration time, ds/bare (per round and the median over rounds) and bare/plain, and peak RSS.

    python benchmarks/dmd2_step_overhead.py [--steps 6] [--threads 1] [--batch 1] [--rounds 3]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.step_overhead import TEXT, peak_rss_mb, print_ways, three_ways  # noqa: E402

STEPS_RAW = [1000, 750, 500, 250]
SHIFT = 3.0
W = 2.0


def recipe(workdir: Path, batch: int) -> dict:
    model = str(workdir / "model")
    return {
        "recipe": {"family": "wan", "method": "dmd2"},
        "roles": {"student": {"path": model, "trainable": True}, "teacher": {"path": model, "trainable": False},
                  "critic": {"path": model, "trainable": True}},
        "training": {"output_dir": str(workdir / "out"), "data_path": str(workdir / "data"), "max_train_steps": 1000,
                     "train_batch_size": batch, "dataloader_num_workers": 0, "mixed_precision": "fp32",
                     "learning_rate": 1e-5, "max_grad_norm": 1.0, "text_len": TEXT[0], "num_frames": 9,
                     "height": 128, "width": 128, "gradient_checkpointing": False, "uncond_embedding": "zeros",
                     "trackers": ["none"], "ds_config": str(workdir / "zero3_train.json"),
                     "ds_config_inference": str(workdir / "zero3_inference.json")},
        "pipeline_config": {"flow_shift": SHIFT},
        "method_config": {"rollout_mode": "simulate", "dmd_denoising_steps": STEPS_RAW,
                          "generator_update_interval": 1, "real_score_guidance_scale": W},
    }


def shifted(raw):
    u = raw / 1000.0
    return 1000.0 * SHIFT * u / (1 + (SHIFT - 1) * u)


def run_way(way: str, workdir: Path, steps: int, batch: int) -> dict:
    import torch

    from ds_distill.dispatch import check_recipe
    from ds_distill.utils import rng
    from ds_distill.utils.config import recipe_from_mapping
    from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

    checked = check_recipe(recipe_from_mapping(recipe(workdir, batch), "<bench>"))
    t = checked.recipe.training
    loader = TrainLoader(ParquetDataset(t.data_path, t.text_len, False), batch, 0, 1, t.seed)
    batches = [next(loader) for _ in range(steps + 2)]
    times, cpu_times = [], []
    if way == "ds":
        from ds_distill.dispatch import build_runtime
        from ds_distill.engines import Strategy, init_distributed

        rt = build_runtime(checked, Strategy(init_distributed()))
        for i, b in enumerate(batches):
            start, cpu = time.perf_counter(), time.process_time()
            rt.method.train_one_step([b], i + 1)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
        return {"way": way, "times": times[2:], "cpu_times": cpu_times[2:], "peak_rss_mb": peak_rss_mb()}

    from diffusers import WanTransformer3DModel

    def load():
        return WanTransformer3DModel.from_pretrained(workdir / "model" / "transformer").float()

    student, critic, teacher = load().train(), load().train(), load().eval().requires_grad_(False)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=t.learning_rate, betas=tuple(t.betas), eps=t.adam_eps,
                                 weight_decay=t.weight_decay, fused=True) for n, m in (("s", student), ("c", critic))}
    call = {"s": student, "c": critic}  # what a forward with grad goes through
    if way == "bare":
        import deepspeed

        from ds_distill.engines import eval_ds_config, init_distributed, load_template, train_ds_config

        init_distributed()
        tcfg = train_ds_config(load_template(t.ds_config, "<b>", "k"), micro_batch=batch, grad_accum=1,
                               world_size=1, precision="fp32", max_grad_norm=t.max_grad_norm)
        ecfg = eval_ds_config(load_template(t.ds_config_inference, "<b>", "k"), micro_batch=batch, world_size=1,
                              precision="fp32", offload="none", nvme_path=None)
        engines = {n: deepspeed.initialize(model=call[n], optimizer=opts[n], config=tcfg)[0] for n in ("s", "c")}
        teacher = deepspeed.initialize(model=teacher, config=ecfg)[0].module
        call = engines

    def v_of(m, x, tt, cond):
        return m(hidden_states=x, timestep=tt, encoder_hidden_states=cond, return_dict=False)[0].float()

    def update(name, loss):
        if way == "bare":
            engines[name].backward(loss)
            engines[name].step()
        else:
            loss.backward()
            module = student if name == "s" else critic
            torch.nn.utils.clip_grad_norm_(module.parameters(), t.max_grad_norm)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

    ts = shifted(torch.tensor(STEPS_RAW, dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 16, 3, 16, 16)

    def rollout(step, stream, grad):
        k = rng.shared_randint(len(STEPS_RAW), t.seed, stream, step)  # same work as ds_distill's draw
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            for i in range(k):
                x0 = x - ts[i] / 1000 * v_of(student, x, ts[i].expand(batch), cond)
                x = (1 - ts[i + 1] / 1000) * x0 + ts[i + 1] / 1000 * torch.randn(shape, generator=gen)
        with torch.set_grad_enabled(grad):
            return x - ts[k] / 1000 * v_of(call["s"] if grad else student, x, ts[k].expand(batch), cond)

    for i, b in enumerate(batches):
        step = i + 1
        start, cpu = time.perf_counter(), time.process_time()
        cond = b["text_embedding"]
        uncond = torch.zeros_like(cond)
        x0 = rollout(step, "rollout_noise", grad=True)
        with torch.no_grad():
            tt = shifted(torch.rand(batch, generator=gen) * 1000).clamp(20, 980)
            s = (tt / 1000).view(-1, 1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * torch.randn(shape, generator=gen)
            fake = x_t - s * v_of(critic, x_t, tt, cond)
            real_c = x_t - s * v_of(teacher, x_t, tt, cond)
            real = real_c + W * (real_c - (x_t - s * v_of(teacher, x_t, tt, uncond)))
            g = (fake - real) / (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        update("s", 0.5 * torch.nn.functional.mse_loss(x0, (x0 - g).detach()))
        with torch.no_grad():
            x0 = rollout(step, "critic_rollout", grad=False)
            tt = shifted(torch.rand(batch, generator=gen) * 1000).clamp(20, 980)
            s = (tt / 1000).view(-1, 1, 1, 1, 1)
            eps = torch.randn(shape, generator=gen)
            x_t = (1 - s) * x0 + s * eps
        update("c", torch.nn.functional.mse_loss(v_of(call["c"], x_t, tt, cond), eps - x0))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    return {"way": way, "times": times[2:], "cpu_times": cpu_times[2:], "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    args, rounds = three_ways(__file__, run_way, steps=6, batch=1)
    print(f"one DMD2 iteration (student + critic update, teacher CFG w={W}), three 23.6M-param Wan transformers, "
          f"batch {args.batch}, {args.threads} thread(s), persistence threshold 0, {args.rounds} rounds of the "
          f"median of {args.steps} after 2 warm-up")
    print_ways(rounds, {"plain": "plain PyTorch", "bare": "bare DeepSpeed engines (ZeRO-3)",
                         "ds": "ds_distill dmd2"}, "iter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
