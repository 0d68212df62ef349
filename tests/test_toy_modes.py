"""make-toy-data's other mixtures (mode count, unequal weights, latent size) and how eval-toy scores them."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import PYTHON, run_cli
from ds_distill.utils.toy_data import (ToyDataConfig, ToyDistribution, load_toy_distribution, make_toy_data,
                                       score_samples)


def test_other_mixture_has_its_modes_weights_and_size(tiny_wan, tmp_path):
    """3 modes weighted 2:1:1 at 48x48 (latent [4, 2, 6, 6]): the rows follow the weights, the data scores as the
    data (coverage 1, balance near 1 against the weights), and equal-count samples score the balance they have."""
    from ds_distill.utils.dataloader import ParquetDataset

    out = make_toy_data(tmp_path / "toy3", tiny_wan, ToyDataConfig(rows_per_caption=64, modes=3,
                                                                    mode_weights=[2, 1, 1], height=48, width=48))
    dist = load_toy_distribution(out)
    torch.testing.assert_close(dist.weights, torch.tensor([0.5, 0.25, 0.25]))
    assert dist.modes.shape == (3, 2) and tuple(dist.centers.shape[1:]) == (4, 2, 6, 6)
    ds = ParquetDataset(out / "latents", 16, need_latents=True)
    lat = torch.stack([ds[i]["vae_latent"] for i in range(len(ds))])
    cap = torch.tensor([dist.captions.index(ds[i]["caption"]) for i in range(len(ds))])
    assert tuple(lat.shape[1:]) == (4, 2, 6, 6)
    vae = json.loads((tiny_wan / "vae" / "config.json").read_text())
    mean = torch.tensor(vae["latents_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(vae["latents_std"]).view(-1, 1, 1, 1)
    z, _ = dist.project((lat - mean) / std, cap)
    nearest = torch.cdist(z, dist.modes).argmin(1)
    freq = torch.bincount(nearest, minlength=3).float() / len(nearest)
    assert float((freq - dist.weights).abs().max()) < 0.1, freq  # 256 draws: ~0.03 standard error
    score = score_samples((lat - mean) / std, cap, dist)
    assert score["coverage"] == 1.0 and score["balance"] > 0.85


def test_balance_is_measured_against_the_mixture_weights():
    """Samples placed exactly on modes, by hand: coverage counts (caption, mode) pairs hit, balance is
    1 - TV(histogram, weights)."""
    modes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    planes = torch.zeros(1, 2, 1, 1, 1, 2)
    planes[0, 0, 0, 0, 0, 0] = planes[0, 1, 0, 0, 0, 1] = 1.0
    dist = ToyDistribution(torch.zeros(1, 1, 1, 1, 2), planes, modes, 0.1, ["c"], torch.tensor([0.5, 0.25, 0.25]))
    on = lambda picks: modes[picks].view(-1, 1, 1, 1, 2)  # noqa: E731
    even = score_samples(on([0, 1, 2, 0, 1, 2]), torch.zeros(6, dtype=torch.long), dist)
    assert even["coverage"] == 1.0 and even["mode_dist"] == pytest.approx(0.0, abs=1e-6)
    assert even["balance"] == pytest.approx(1 - 0.5 * (1 / 6 + 1 / 12 + 1 / 12), abs=1e-6)
    weighted = score_samples(on([0, 0, 1, 2]), torch.zeros(4, dtype=torch.long), dist)
    assert weighted["balance"] == pytest.approx(1.0, abs=1e-6)
    one_mode = score_samples(on([0, 0, 0, 0]), torch.zeros(4, dtype=torch.long), dist)
    assert one_mode["coverage"] == pytest.approx(1 / 3) and one_mode["balance"] == pytest.approx(0.5, abs=1e-6)
    # without weights (older toy files): equal weights
    assert torch.equal(ToyDistribution(dist.centers, planes, modes, 0.1, ["c"]).weights, torch.full((3,), 1 / 3))


def test_default_mixture_is_unchanged(tiny_wan, toy_data):
    """The default data keeps equal weights and its ring of four modes at 45 degrees + k*90."""
    dist = load_toy_distribution(toy_data)
    torch.testing.assert_close(dist.weights, torch.full((4,), 0.25))
    angles = torch.atan2(dist.modes[:, 1], dist.modes[:, 0])
    torch.testing.assert_close(angles, torch.tensor([1, 3, -3, -1]) * math.pi / 4)


@pytest.mark.parametrize("args, message", [
    (["--modes", "3", "--mode-weights", "1,2"], "--mode-weights: 2 weights for 3 modes"),
    (["--mode-weights", "1,0,1,1"], "--mode-weights 1.0,0.0,1.0,1.0: weights must be positive"),
    (["--height", "40"], "height 40: must be a multiple of 16"),
])
def test_bad_mixture_options_are_one_line(tiny_wan, tmp_path, args, message):
    out = tmp_path / "toy"
    res = run_cli([PYTHON, "-m", "ds_distill.cli", "make-toy-data", str(out), "--model", str(tiny_wan), *args])
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
