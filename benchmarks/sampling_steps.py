"""Few-step SDE sampling vs 50-step ODE sampling with classifier-free guidance, on the tiny Wan, in one run.

Anchor: both loops spend their time in transformer calls. The SDE loop of a few-step student makes one call per
timestep (guidance 1); the ODE loop with guidance > 1 makes two per step (conditional + unconditional). So
4 SDE steps should cost 4 / (50 * 2) = 0.04 of 50 guided ODE steps. The script times both loops (median of
--repeats), one bare transformer call, and prints the measured ratio, the expected one, and where the gap
comes from: each loop's own work per step (noise draws and the fused SDE step; the scheduler step and the CFG
combine), timed by running the loops with a no-op denoiser.

Run: python benchmarks/sampling_steps.py [--model TINY_WAN_DIR] [--height 128 --width 128 --num-frames 17]
                                         [--repeats 5] [--threads 1]
Without --model a tiny Wan is made in a temporary folder (`ds-distill make-tiny-wan`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: lazy op load, allocator, first-touch pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Diffusers Wan directory (default: a fresh tiny Wan)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--sde-timesteps", type=float, nargs="+", default=[1000, 750, 500, 250])
    p.add_argument("--ode-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="ODE guidance (the SDE runs at 1)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import WanTransformer3DModel

    from ds_distill.models.components import read_components
    from ds_distill.models.wan_common import latent_shape_for
    from ds_distill.samplers import denoiser_from_module, initial_noise, sample_latents

    tmp = None
    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        from ds_distill.models.tiny import make_tiny_wan

        tmp = tempfile.TemporaryDirectory(prefix="tiny_wan_")
        model_dir = make_tiny_wan(Path(tmp.name) / "tiny_wan")
    comps = read_components(model_dir)
    flow_shift = float(comps.scheduler_config.get("shift", 3.0))
    transformer = WanTransformer3DModel.from_pretrained(str(model_dir / "transformer")).eval()
    params = sum(t.numel() for t in transformer.parameters())
    shape = (1, *latent_shape_for(comps.vae_config, args.num_frames, args.height, args.width))
    patch = comps.transformer_config.get("patch_size", [1, 2, 2])
    tokens = (shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2])
    text_dim = comps.transformer_config.get("text_dim", 4096)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, args.text_len, text_dim, generator=g)
    uncond = torch.randn(1, args.text_len, text_dim, generator=g)
    denoiser = denoiser_from_module(transformer)

    def one_call():
        with torch.no_grad():
            denoiser(torch.randn(shape), torch.tensor([500.0]), cond)

    def no_model(x, t, c):  # isolates the loops' own work (noise, SDE step, scheduler step, CFG combine)
        return torch.zeros_like(x)

    def sde(den=denoiser):
        gen = torch.Generator().manual_seed(1)
        sample_latents("sde", den, initial_noise(shape, gen, "cpu"), cond, flow_shift=flow_shift,
                       generator=gen, raw_timesteps=args.sde_timesteps)

    def ode(den=denoiser):
        gen = torch.Generator().manual_seed(1)
        sample_latents("ode", den, initial_noise(shape, gen, "cpu"), cond, flow_shift=flow_shift,
                       generator=gen, num_steps=args.ode_steps, guidance_scale=args.guidance, uncond=uncond,
                       scheduler_config=comps.scheduler_config)

    k, n = len(args.sde_timesteps), args.ode_steps
    cfg = 2 if args.guidance > 1 else 1
    # Interleaved, and the SDE timed over enough back-to-back runs to last as long as one ODE run, so both
    # see the same load from other jobs; the ratio is that of the two medians (the per-round spread is printed).
    inner = max(1, round(n * cfg / k))
    print(f"tiny Wan ({params / 1e6:.2f} M params) from {model_dir}")
    print(f"latents {list(shape)} ({args.num_frames} frames {args.width}x{args.height}, {tokens} tokens), "
          f"{args.threads} thread(s), median of {args.repeats} interleaved rounds "
          f"({inner} SDE runs + 1 ODE run each)")
    sde(), ode()  # warm-up
    rounds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(inner):
            sde()
        mid = time.perf_counter()
        ode()
        rounds.append(((mid - start) / inner, time.perf_counter() - mid))
    t_sde = statistics.median(r[0] for r in rounds)
    t_ode = statistics.median(r[1] for r in rounds)
    t_call = median_seconds(one_call, args.repeats * 4)
    loop_sde = median_seconds(lambda: sde(no_model), args.repeats * 4)
    loop_ode = median_seconds(lambda: ode(no_model), args.repeats)
    print(f"  SDE {k:3d} steps, guidance 1   ({k * 1:4d} calls) {t_sde * 1e3:9.2f} ms")
    print(f"  ODE {n:3d} steps, guidance {args.guidance:g} ({n * cfg:4d} calls) {t_ode * 1e3:9.2f} ms")
    print(f"  one transformer call                      {t_call * 1e3:9.2f} ms")
    print(f"  SDE loop without the model                {loop_sde * 1e3:9.2f} ms  ({loop_sde / k * 1e3:.2f} ms/step)")
    print(f"  ODE loop without the model                {loop_ode * 1e3:9.2f} ms  ({loop_ode / n * 1e3:.2f} ms/step)")
    expected = k / (n * cfg)
    measured = t_sde / t_ode
    per_round = sorted(a / b for a, b in rounds)
    print(f"ratio SDE/ODE: measured {measured:.4f} (rounds: {per_round[0]:.4f} to {per_round[-1]:.4f}), expected "
          f"{k}/{n} x 1/{cfg} (CFG) = {expected:.4f} (measured/expected {measured / expected:.2f}; SDE is "
          f"{1 / measured:.1f}x faster)")
    predicted = (k * t_call + loop_sde) / (n * cfg * t_call + loop_ode)
    call_sde = (t_sde - loop_sde) / k
    call_ode = (t_ode - loop_ode) / (n * cfg)
    print(f"gap: the expected ratio counts transformer calls only. (1) Each loop's own work, timed with a no-op "
          f"denoiser, is {loop_sde / k * 1e3:.2f} ms/step for the SDE (noise draw + fused sde_step) and "
          f"{loop_ode / n * 1e3:.2f} ms/step for the ODE (scheduler.step + CFG combine), small next to a "
          f"{t_call * 1e3:.2f} ms call: with it the ratio would be {predicted:.4f}. (2) The remaining factor "
          f"{measured / predicted:.2f} is calls running at different speeds inside the two loops "
          f"({call_sde * 1e3:.2f} ms per SDE call vs {call_ode * 1e3:.2f} ms per ODE call, medians): call-to-call "
          f"variation from other jobs on this shared machine and caches, which interleaving and medians only damp.")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
