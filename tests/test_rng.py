"""ds_distill.utils.rng: per-sample draws are a pure function of (seed, stream, extra, sample id), on the
device asked for, and one call over ids [0..3] equals two ranks' calls over [0, 1] and [2, 3]."""
import pytest
import torch

from ds_distill.utils import rng

SHAPE = (4, 3, 8, 8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_randn_is_a_pure_function_of_seed_stream_and_id(device):
    ids = torch.tensor([0, 1, 2, 3])
    a = rng.per_sample_randn(SHAPE, ids, 7, "noise", device=device)
    rng.per_sample_randn(SHAPE, torch.tensor([9]), 123, "critic_noise", device=device)  # reseeds the cached generator
    b = rng.per_sample_randn(SHAPE, ids, 7, "noise", device=device)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (4, *SHAPE)
    assert torch.device(device).type == a.device.type
    # every key changes the numbers
    for other in (rng.per_sample_randn(SHAPE, ids, 8, "noise", device=device),
                  rng.per_sample_randn(SHAPE, ids, 7, "score_noise", device=device),
                  rng.per_sample_randn(SHAPE, ids, 7, "noise", extra=1, device=device)):
        assert not torch.allclose(a, other)
    assert not torch.allclose(a[0], a[1])
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1) < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_one_rank_equals_two_ranks(device):
    full = rng.per_sample_randn(SHAPE, torch.tensor([0, 1, 2, 3]), 3, "rollout_noise", extra=2, device=device)
    halves = [rng.per_sample_randn(SHAPE, torch.tensor(ids), 3, "rollout_noise", extra=2, device=device)
              for ids in ([0, 1], [2, 3])]
    assert torch.equal(full, torch.cat(halves))
    reordered = rng.per_sample_randn(SHAPE, torch.tensor([3, 1]), 3, "rollout_noise", extra=2, device=device)
    assert torch.equal(reordered, full[[3, 1]])
    for fn in (rng.per_sample_rand, rng.per_sample_normal):
        whole = fn(torch.tensor([0, 1, 2, 3]), 3, "timestep")
        assert torch.equal(whole, torch.cat([fn(torch.tensor([0, 1]), 3, "timestep"),
                                             fn(torch.tensor([2, 3]), 3, "timestep")]))


def test_cpu_numbers_are_those_of_a_seeded_cpu_generator():
    """CPU draws stay what they were (checkpoints and recorded runs keep their noise)."""
    ids = torch.tensor([5, 17])
    got = rng.per_sample_randn(SHAPE, ids, 11, "noise", extra=3)
    want = torch.stack([torch.randn(SHAPE, generator=rng.generator(11, rng.STREAMS["noise"], 3, i)) for i in (5, 17)])
    assert torch.equal(got, want)
    u = rng.per_sample_rand(ids, 11, "cfg_drop")
    assert torch.equal(u, torch.stack([torch.rand((), generator=rng.generator(11, 3, 0, i)) for i in (5, 17)]))
    z = rng.per_sample_normal(ids, 11, "timestep")
    assert torch.equal(z, torch.stack([torch.randn((), generator=rng.generator(11, 2, 0, i)) for i in (5, 17)]))
    assert rng.per_sample_rand(torch.tensor([], dtype=torch.long), 0, "timestep").shape == (0,)


def test_device_argument_is_honoured():
    ids = torch.tensor([0, 1])
    assert rng.per_sample_randn(SHAPE, ids, 0, "noise", device=torch.device("cpu")).device.type == "cpu"
    assert torch.equal(rng.per_sample_randn(SHAPE, ids, 0, "noise", device="cpu"),
                       rng.per_sample_randn(SHAPE, ids, 0, "noise"))
    with pytest.raises(RuntimeError):  # a device without generators is refused, not silently drawn on the CPU
        rng.per_sample_randn(SHAPE, ids, 0, "noise", device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs it)")
def test_cuda_draws_happen_on_the_device():
    ids = torch.tensor([0, 1])
    out = rng.per_sample_randn(SHAPE, ids, 0, "noise", device="cuda")
    assert out.is_cuda
    assert torch.equal(out[1:], rng.per_sample_randn(SHAPE, torch.tensor([1]), 0, "noise", device="cuda:0"))
