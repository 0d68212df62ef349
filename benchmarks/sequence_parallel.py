"""Sequence parallelism (DeepSpeed-Ulysses): activation memory per rank and seconds per step, SP 2 vs SP 1.

A Wan transformer of Wan2.1-1.3B width (dim 1536, 12 heads, ffn 8960, text_dim 4096; `--layers` blocks, default 2)
in fp32, one sample of `--frames` x `--height` x `--width` latents (default 4 x 64 x 128: 4 x 32 x 64 = 8,192
tokens), a flow-matching style MSE loss, forward + backward, 2 CPU ranks (gloo):

- SP 1: one process runs the whole sequence alone (first, before the 2-rank group starts);
- SP 2: two ranks run the same sample, each keeping half the tokens (`ds_distill.models.wan_ulysses`, self-attention
  through DeepSpeed's DistributedAttention).

Activation memory is measured as the bytes of the distinct tensors autograd saves for backward (a
`torch.autograd.graph.saved_tensors_hooks` meter, parameters excluded), i.e. what is held between the end of
forward and backward; transient buffers inside one op are not counted. Both runs are checked to give the same
output. Plain PyTorch modules (no ZeRO-3): parameter memory is the same in both and not what SP changes.

    python benchmarks/sequence_parallel.py [--layers 2] [--frames 4] [--height 64] [--width 128] [--steps 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.scale_rehearsal import WAN_1_3B  # noqa: E402

RANKS = 2
BOUND = 0.6
"""Must hold: SP 2 activation memory per rank <= BOUND x SP 1's."""


class SavedBytes:
    """Counts the distinct storages autograd saves for backward (parameters excluded) while active."""

    def __init__(self, params):
        import torch

        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip:
            self.seen.setdefault(ptr, storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self.seen = {}
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def step(model, x, t, cond, target) -> tuple:
    """One forward + backward; (seconds, activation bytes saved for backward, output)."""
    import torch

    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    with SavedBytes(model.parameters()) as meter:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
    saved = meter.total
    loss.backward()
    return time.perf_counter() - started, saved, out.detach()


def build(args):
    """The model (same seed everywhere) and one sample: (model, x, t, cond, target, tokens)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_layers=args.layers, **WAN_1_3B)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, args.frames, args.height, args.width, generator=g)
    target = torch.randn(x.shape, generator=g)
    cond = torch.randn(1, 16, 4096, generator=g)
    return model, x, torch.tensor([500.0]), cond, target, args.frames * (args.height // 2) * (args.width // 2)


def whole_sequence(args, reference: Path) -> None:
    """SP 1: this process alone runs the whole sequence; figures and output go to `reference`."""
    import torch

    model, x, t, cond, target, _ = build(args)
    runs = [step(model, x, t, cond, target) for _ in range(args.steps)]
    torch.save({"seconds": min(s for s, _, _ in runs), "saved": runs[-1][1], "out": runs[-1][2]}, reference)


def worker(args) -> None:
    """SP 2 on 2 ranks; rank 0 prints the table against the SP 1 reference."""
    import torch

    from ds_distill.engines import Strategy, init_distributed
    from ds_distill.models.wan_ulysses import install_wan

    strategy = Strategy(init_distributed())
    model, x, t, cond, target, tokens = build(args)
    install_wan(model, strategy.init_sequence_parallel(RANKS))
    two = [step(model, x, t, cond, target) for _ in range(args.steps)]
    per_rank = [torch.zeros(1) for _ in range(RANKS)]
    torch.distributed.all_gather(per_rank, torch.tensor([float(two[-1][1])]))
    if strategy.dist.rank == 0:
        one = torch.load(args.reference)
        n = sum(p.numel() for p in model.parameters())
        diff = float((two[-1][2] - one["out"]).abs().max())
        mem1, mem2 = one["saved"], max(float(v) for v in per_rank)
        s1, s2 = one["seconds"], min(s for s, _, _ in two)
        print(f"Wan2.1-1.3B width, {args.layers} blocks ({n / 1e6:.1f} M params), fp32, 1 sample of {tokens} tokens "
              f"({args.frames}x{args.height // 2}x{args.width // 2} after patching), forward + backward on CPU/gloo, "
              f"fastest of {args.steps} step(s)")
        print("activation memory = bytes of the tensors saved for backward (saved_tensors_hooks, parameters "
              "excluded), per rank")
        print(f"{'':8}{'ranks':>6}{'activations/rank':>18}{'s/step':>9}")
        print(f"{'SP 1':8}{1:>6}{mem1 / 2**20:>14.1f} MiB{s1:>9.2f}")
        print(f"{'SP 2':8}{RANKS:>6}{mem2 / 2**20:>14.1f} MiB{s2:>9.2f}   (per rank: "
              f"{', '.join(f'{float(v) / 2**20:.1f}' for v in per_rank)} MiB)")
        ratio = mem2 / mem1
        print(f"SP 2 / SP 1: activations {ratio:.3f}x (bound {BOUND}x: {'met' if ratio <= BOUND else 'NOT met'}), "
              f"time {s2 / s1:.2f}x; outputs differ by at most {diff:.2e}")
    strategy.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--height", type=int, default=64, help="latent height")
    parser.add_argument("--width", type=int, default=128, help="latent width")
    parser.add_argument("--steps", type=int, default=1, help="steps per setting (the fastest is reported)")
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return 0
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "sp1.pt"
        whole_sequence(args, reference)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(RANKS), __file__, *sys.argv[1:], "--reference", str(reference)]).returncode


if __name__ == "__main__":
    sys.exit(main())
