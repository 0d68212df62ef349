"""Parquet loading (schema, dtypes, padding, sharding, resume position), latent normalisation, the toy data."""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ds_distill.errors import DataError
from ds_distill.utils.dataloader import GlobalBatchSampler, ParquetDataset, TrainLoader
from ds_distill.utils.dataset_schema import T2V_SCHEMA, tensor_from_bytes, tensor_to_bytes
from ds_distill.utils.toy_data import ToyDataConfig, load_toy_distribution, score_samples


def write_rows(path, n, latent_dtype="float32", text_dtype="float32", text_len=5, start=0):
    rows = []
    for i in range(start, start + n):
        lat = torch.full((4, 2, 4, 4), float(i)).to(getattr(torch, latent_dtype))
        txt = (torch.arange(text_len * 8, dtype=torch.float32).reshape(text_len, 8) + i).to(getattr(torch, text_dtype))
        rows.append({"id": str(i), "vae_latent_bytes": tensor_to_bytes(lat), "vae_latent_shape": [4, 2, 4, 4],
                     "vae_latent_dtype": latent_dtype, "text_embedding_bytes": tensor_to_bytes(txt),
                     "text_embedding_shape": [text_len, 8], "text_embedding_dtype": text_dtype, "file_name": "",
                     "caption": f"c{i}", "media_type": "video", "width": 32, "height": 32, "num_frames": 5,
                     "duration_sec": 0.3, "fps": 16.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=T2V_SCHEMA), path, row_group_size=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bytes_roundtrip_honours_dtype(dtype):
    t = torch.randn(3, 5).to(getattr(torch, dtype))
    back = tensor_from_bytes(tensor_to_bytes(t), [3, 5], dtype)
    assert back.dtype == t.dtype and torch.equal(back, t)
    with pytest.raises(ValueError, match="do not hold shape"):
        tensor_from_bytes(tensor_to_bytes(t), [3, 6], dtype)


def test_directory_of_files_padding_and_dtypes(tmp_path):
    write_rows(tmp_path / "a" / "p0.parquet", 4, latent_dtype="bfloat16", text_dtype="float16", text_len=20)
    write_rows(tmp_path / "b" / "p1.parquet", 3, start=4, text_len=5)
    ds = ParquetDataset(tmp_path, text_len=16, need_latents=True)
    assert len(ds) == 7
    r = ds[5]  # second file, second row group
    assert r["caption"] == "c5" and torch.equal(r["vae_latent"], torch.full((4, 2, 4, 4), 5.0))
    assert r["text_mask"].tolist() == [True] * 5 + [False] * 11
    assert torch.equal(r["text_embedding"][:5], torch.arange(40.0).reshape(5, 8) + 5)
    assert torch.all(r["text_embedding"][5:] == 0)
    cropped = ds[1]  # 20 tokens cropped to 16
    assert cropped["text_mask"].all() and torch.equal(
        cropped["text_embedding"], (torch.arange(160.0).reshape(20, 8) + 1)[:16].half().float())


def test_missing_column_is_a_data_error(tmp_path):
    pq.write_table(pa.table({"id": ["0"], "caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: column 'text_embedding_bytes' is missing"):
        ParquetDataset(tmp_path, 16, need_latents=False)


def test_ranks_split_each_global_batch_and_resume(tmp_path):
    n, micro, world = 23, 2, 3
    samplers = [GlobalBatchSampler(n, micro, r, world, seed=1) for r in range(world)]
    one_rank = GlobalBatchSampler(n, micro * world, 0, 1, seed=1)
    for step in range(10):  # crosses epochs (3 steps per epoch)
        parts = [s.indices_at(step) for s in samplers]
        assert sum(parts, []) == one_rank.indices_at(step)
        assert len(set(sum(parts, []))) == micro * world
    epoch0 = sum((one_rank.indices_at(s) for s in range(3)), [])
    assert len(set(epoch0)) == 18  # no repeats within an epoch
    write_rows(tmp_path / "d" / "p.parquet", n)
    ds = ParquetDataset(tmp_path / "d", 16, True)
    straight = TrainLoader(ds, micro, 1, world, seed=1)
    batches = [next(straight) for _ in range(5)]
    resumed = TrainLoader(ds, micro, 1, world, seed=1, start_micro_step=3)
    for want in batches[3:]:
        got = next(resumed)
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["sample_ids"], want["sample_ids"])


def test_adapter_normalises_latents_per_channel(tiny_wan, toy_data):
    import json

    from ds_distill.adapters.wan import WanAdapter
    from ds_distill.models.components import read_components
    from ds_distill.utils.config import PipelineConfig, TrainingConfig

    comps = read_components(tiny_wan)
    t = TrainingConfig(output_dir="x", data_path="y", mixed_precision="fp32", text_len=16, num_frames=5,
                       height=32, width=32)
    a = WanAdapter(comps, PipelineConfig(), t, torch.device("cpu"))
    ds = ParquetDataset(toy_data / "latents", 16, True)
    loader = TrainLoader(ds, 4, 0, 1, seed=0)
    raw = next(loader)
    b = a.prepare_batch(raw, "data")
    vae = json.loads((tiny_wan / "vae" / "config.json").read_text())
    mean = torch.tensor(vae["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(b.latents, (raw["vae_latent"] - mean) / std)
    assert b.latent_shape == a.sample_latent_shape == (4, 2, 4, 4)
    torch.testing.assert_close(a.denormalize_latents(b.latents), raw["vae_latent"])


def test_toy_distribution_scores(toy_data):
    """The data scores as the mixture says; shrinking z towards the center (mode averaging) scores worse."""
    dist = load_toy_distribution(toy_data)
    cfg = ToyDataConfig()
    g = torch.Generator().manual_seed(3)
    n = 400
    ci = torch.arange(n) % len(dist.captions)
    mode = torch.randint(len(dist.modes), (n,), generator=g)
    z = dist.modes[mode] + cfg.mode_std * torch.randn(n, 2, generator=g)
    x = dist.centers[ci] + torch.einsum("nk,nkd->nd", z, dist.planes.flatten(2)[ci]).view_as(dist.centers[ci])
    data = score_samples(x, ci, dist)
    assert data["radius"] == pytest.approx(cfg.radius, rel=0.05)
    assert data["mode_dist"] == pytest.approx(cfg.mode_std * math.sqrt(math.pi / 2), rel=0.15)  # Rayleigh mean
    assert data["coverage"] == 1.0 and data["balance"] > 0.85 and data["off_plane"] < 1e-5
    blurred = score_samples(dist.centers[ci] + 0.4 * (x - dist.centers[ci]), ci, dist)
    assert blurred["radius"] == pytest.approx(0.4 * data["radius"], rel=1e-4)
    assert blurred["mode_dist"] > 4 * data["mode_dist"]
