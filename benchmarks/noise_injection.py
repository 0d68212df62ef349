"""Fused noise injection: eager composition vs stock torch vs our kernel vs the bandwidth ceiling.

For each dtype, on tensors far larger than the CPU caches (or the GPU's L2 with --device cuda),
times (median of --repeats):
  add_noise  x_t = (1 - sigma)*x0 + sigma*eps, sigma per sample from the timestep (reads 2, writes 1)
    eager    the reference: sigma by torch ops, then (1 - s)*x0 + s*eps with fp32 casts
    stock    sigma by torch ops, then torch.lerp(x0, eps, sigma broadcast)
    fused    ds_distill.ops.add_noise (one kernel)
    ceiling  torch.add(x0, eps, out=c): the same bytes streamed, no math
  sde_step   x0_hat = x_t - st*v; x_next = (1 - sn)*x0_hat + sn*eps (reads 3, writes 2)
    eager    the reference
    stock    torch.addcmul(x_t, st, v, value=-1), then torch.lerp(x0_hat, eps, sn)
    fused    ds_distill.ops.sde_step (one kernel)
Each runs into preallocated outputs (out=, like the ceiling) and allocating its outputs (what training code
usually does: a fresh output of this size is page-faulted in on first touch, which costs more than the math).
The out= rows time the kernels and carry the targets; the allocating rows mostly time the kernel's page
faults (about 4 GB/s whoever writes the pages), so they are shown, not judged. On the CPU one more row runs the
fused op with transparent huge pages advised for its outputs (opt-in: DS_DISTILL_HUGE_PAGES=1), which is fast
while the kernel has free huge pages and slow once it must compact memory to find them.
GB/s counts the bytes each op must read and write (inputs + outputs), not what an implementation moves.

On a GPU every call is bracketed by torch.cuda.synchronize(), so the times are kernel wall times.

Run: python benchmarks/noise_injection.py [--numel 67108864] [--threads N] [--dtypes float32,bfloat16]
     python benchmarks/noise_injection.py --device cuda --dtypes float32,bfloat16,float16 --repeats 50
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from ds_distill.ops import add_noise, add_noise_reference, noise_op_backend, sde_step, sde_step_reference
from ds_distill.ops.reference import sigma_from_timestep

ADD_TARGET_VS_CEILING = 0.9
SDE_TARGET_VS_STOCK = 1.15


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each fn. Calls are interleaved round-robin, so load from other
    processes drifting over the run hits every candidate alike instead of whichever ran at that moment."""
    for fn in fns.values():
        fn()  # warm-up (first touch, lazy op load)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def l3_cache() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.strip().startswith("L3"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


class Table:
    def __init__(self, title: str, nbytes: int):
        self.title, self.nbytes, self.rows = title, nbytes, {}

    def add(self, name: str, seconds: float) -> None:
        self.rows[name] = seconds
        gbs = self.nbytes / seconds / 1e9
        print(f"  {name:<38s} {seconds * 1e3:9.2f} ms  {gbs:7.2f} GB/s")

    def add_all(self, medians: dict) -> None:
        for name, seconds in medians.items():
            self.add(name, seconds)

    def gbs(self, name: str) -> float:
        return self.nbytes / self.rows[name] / 1e9

    def ratio(self, a: str, b: str) -> float:
        return self.gbs(a) / self.gbs(b)


def shape_for(numel: int, batch: int) -> tuple[int, ...]:
    per = numel // batch
    return (batch, 16, per // (16 * 64 * 64), 64, 64) if per % (16 * 64 * 64) == 0 else (batch, per)


def with_huge_pages(module, fn):
    """fn run with the CPU kernel advising huge pages for every output it allocates."""
    def run():
        before = module.huge_page_threshold()
        module.set_huge_page_threshold(0)
        try:
            return fn()
        finally:
            module.set_huge_page_threshold(before)
    return run


def bench_dtype(dtype: torch.dtype, numel: int, repeats: int, eager_repeats: int, verdicts: list,
                device: str = "cpu", module=None) -> None:
    batch = 4
    shape = shape_for(numel, batch)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    eps = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    timesteps = torch.tensor([999.0, 750.0, 500.0, 0.0], device=device)
    shift = 5.0
    item = x0.element_size()
    out0, out1 = torch.empty_like(x0), torch.empty_like(x0)
    bshape = (batch,) + (1,) * (len(shape) - 1)
    huge_row = device == "cpu" and module is not None
    print(f"\n== {dtype} x {tuple(shape)} ({x0.numel() / 2**20:.0f} Mi elements, {x0.numel() * item / 2**20:.0f} MiB "
          f"per tensor)")

    # ---- add_noise: 2 reads + 1 write ----
    t = Table("add_noise", 3 * x0.numel() * item)
    print(f"add_noise (bytes per call: {t.nbytes / 1e6:.0f} MB = read x0, eps + write x_t)")

    def stock_add(out=None):
        w = sigma_from_timestep(timesteps, shift).to(dtype).view(bshape)
        return torch.lerp(x0, eps, w) if out is None else torch.lerp(x0, eps, w, out=out)

    t.add_all(median_seconds(
        {"eager composition (reference)": lambda: add_noise_reference(x0, eps, timesteps, shift=shift)},
        eager_repeats))
    t.add_all(median_seconds({
        "stock: sigma ops + torch.lerp": lambda: stock_add(),
        "stock: sigma ops + torch.lerp(out=)": lambda: stock_add(out0),
        "fused add_noise": lambda: add_noise(x0, eps, timesteps, shift=shift),
        "fused add_noise(out=)": lambda: add_noise(x0, eps, timesteps, shift=shift, out=out0),
        "ceiling: torch.add(x0, eps)": lambda: torch.add(x0, eps),
        "ceiling: torch.add(x0, eps, out=c)": lambda: torch.add(x0, eps, out=out1),
    } | ({"fused add_noise, huge pages advised": with_huge_pages(
        module, lambda: add_noise(x0, eps, timesteps, shift=shift))} if huge_row else {}), repeats))
    err = (add_noise(x0, eps, timesteps, shift=shift).float()
           - add_noise_reference(x0, eps, timesteps, shift=shift).float()).abs().max().item()
    print(f"  max |fused - reference| = {err:.3g}")
    r_ceil = t.ratio("fused add_noise(out=)", "ceiling: torch.add(x0, eps, out=c)")
    r_stock_out = t.ratio("fused add_noise(out=)", "stock: sigma ops + torch.lerp(out=)")
    r_stock = t.ratio("fused add_noise", "stock: sigma ops + torch.lerp")
    r_ceil_alloc = t.ratio("fused add_noise", "ceiling: torch.add(x0, eps)")
    r_eager = t.ratio("fused add_noise", "eager composition (reference)")
    ceiling_gbs = t.gbs("ceiling: torch.add(x0, eps, out=c)")
    print(f"  ratio fused(out=) / ceiling(out=)  = {r_ceil:5.2f}x   (target >= {ADD_TARGET_VS_CEILING})")
    print(f"  ratio fused(out=) / stock(out=)    = {r_stock_out:5.2f}x   (target >= 1.0)")
    print(f"  ratio fused / stock, allocating    = {r_stock:5.2f}x   (page faults dominate both)")
    print(f"  ratio fused / ceiling, allocating  = {r_ceil_alloc:5.2f}x")
    print(f"  ratio fused / eager                = {r_eager:5.2f}x")
    verdicts += [
        (f"{dtype} add_noise fused/ceiling (out=) >= {ADD_TARGET_VS_CEILING}", r_ceil >= ADD_TARGET_VS_CEILING),
        (f"{dtype} add_noise fused/stock (out=) >= 1.0", r_stock_out >= 1.0),
    ]

    # ---- sde_step: 3 reads + 2 writes ----
    s = Table("sde_step", 5 * x0.numel() * item)
    print(f"sde_step (bytes per call: {s.nbytes / 1e6:.0f} MB = read x_t, v, eps + write x0_hat, x_next)")
    sigma_t = torch.tensor([0.9, 0.7, 0.5, 0.3], device=device)
    sigma_next = torch.tensor([0.7, 0.5, 0.3, 0.1], device=device)
    st_b = sigma_t.to(dtype).view(bshape)
    sn_b = sigma_next.to(dtype).view(bshape)

    def stock_sde(outs=None):
        if outs is None:
            x0_hat = torch.addcmul(x0, st_b, v, value=-1)
            return x0_hat, torch.lerp(x0_hat, eps, sn_b)
        torch.addcmul(x0, st_b, v, value=-1, out=outs[0])
        return outs[0], torch.lerp(outs[0], eps, sn_b, out=outs[1])

    s.add_all(median_seconds(
        {"eager composition (reference)": lambda: sde_step_reference(x0, v, sigma_t, sigma_next, eps)},
        eager_repeats))
    s.add_all(median_seconds({
        "stock: addcmul + lerp": lambda: stock_sde(),
        "stock: addcmul + lerp (out=)": lambda: stock_sde((out0, out1)),
        "fused sde_step": lambda: sde_step(x0, v, sigma_t, sigma_next, eps),
        "fused sde_step(out=)": lambda: sde_step(x0, v, sigma_t, sigma_next, eps, out=(out0, out1)),
    } | ({"fused sde_step, huge pages advised": with_huge_pages(
        module, lambda: sde_step(x0, v, sigma_t, sigma_next, eps))} if huge_row else {}), repeats))
    fused = sde_step(x0, v, sigma_t, sigma_next, eps)
    ref = sde_step_reference(x0, v, sigma_t, sigma_next, eps)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused, ref))
    print(f"  max |fused - reference| = {err:.3g}")
    r_out = s.ratio("fused sde_step(out=)", "stock: addcmul + lerp (out=)")
    r_alloc = s.ratio("fused sde_step", "stock: addcmul + lerp")
    r_eager = s.ratio("fused sde_step", "eager composition (reference)")
    print(f"  ratio fused(out=) / stock(out=)    = {r_out:5.2f}x   (target >= {SDE_TARGET_VS_STOCK})")
    print(f"  ratio fused / stock, allocating    = {r_alloc:5.2f}x   (page faults dominate both)")
    print(f"  ratio fused / eager                = {r_eager:5.2f}x")
    r_sde_ceil = s.gbs("fused sde_step(out=)") / ceiling_gbs
    print(f"  GB/s fused sde_step(out=) / add ceiling(out=) GB/s = {r_sde_ceil:5.2f}x")
    if device != "cpu":
        verdicts.append((f"{dtype} sde_step fused GB/s / ceiling GB/s >= {ADD_TARGET_VS_CEILING} (GPU target)",
                         r_sde_ceil >= ADD_TARGET_VS_CEILING))
    verdicts += [
        (f"{dtype} sde_step fused/stock (out=) >= {SDE_TARGET_VS_STOCK}", r_out >= SDE_TARGET_VS_STOCK),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor (default 64 Mi)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: all cores this process may use)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--eager-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    backend = noise_op_backend(args.device)
    from ds_distill.ops.noise_injection import _select

    module = _select(args.device).module
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}; L2: {props.L2_cache_size / 2**20:.0f} MiB; torch {torch.__version__} "
              f"(CUDA {torch.version.cuda})")
    print(f"CPU: {cpu_model()}; L3: {l3_cache()}; torch {torch.__version__}")
    print(f"threads: {torch.get_num_threads()} (torch.set_num_threads({args.threads})); "
          f"median of {args.repeats} (eager: {args.eager_repeats}) after one warm-up, candidates interleaved")
    print(f"fused op backend on {args.device}: {backend}", end="")
    if module is not None and args.device == "cpu":
        huge = module.huge_page_threshold()
        print(f" (AVX2 path: {module.has_avx2()}, streaming stores from "
              f"{module.streaming_store_threshold() / 2**20:.0f} MiB per call, huge pages for its outputs: "
              f"{'from %.0f MiB' % (huge / 2**20) if huge < 2**62 else 'off (DS_DISTILL_HUGE_PAGES=1 enables)'})")
    elif module is not None:
        print()
    else:
        print(f"  -- WARNING: the {args.device} kernel did not load; 'fused' rows time the reference")
    print("note: for bf16 the stock ops need bf16 weights, so their sigma is rounded to bf16 (ours stays fp32)")
    verdicts: list = []
    for name in args.dtypes.split(","):
        bench_dtype(getattr(torch, name.strip()), args.numel, args.repeats, args.eager_repeats, verdicts,
                    args.device, module)
    print("\nTargets:")
    for text, ok in verdicts:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
