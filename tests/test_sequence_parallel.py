"""Sequence parallelism (DeepSpeed-Ulysses, `training.sp_size`): SP changes memory and speed, never the numbers.

Training runs are fp32 on ZeRO-3 with stage3_param_persistence_threshold 0 (parameters really partitioned over
both ranks) and gradient checkpointing on (the all-to-alls run again in the recompute). `sp_size: 2` on 2 ranks is
compared with `sp_size: 1` on 1 rank at the same global batch: losses and gradient norms at every step, and the
final fp32 weights. The samplers are compared in a 2-process group on the tiny model directly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    PYTHON,
    REPO,
    deepspeed_cmd,
    dmd2_recipe,
    finetune_recipe,
    read_metrics,
    run_cli,
    three_role_dmd2_recipe,
    train_cmd,
    write_recipe,
)

LOSS_RTOL = 1e-5
"""Relative tolerance of losses and gradient norms, SP 2 vs SP 1 (fp32; only summation order differs)."""
WEIGHT_ATOL = 1e-5
"""Largest absolute difference of any final fp32 weight (AdamW steps of lr 1e-3 from weights of order 0.1-1)."""


def _launch(recipe: Path, nproc: int, *extra: str) -> subprocess.Popen:
    cmd = train_cmd(recipe, *extra) if nproc == 1 else deepspeed_cmd(nproc, recipe, *extra)
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_all(procs: dict) -> dict:
    logs = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
        logs[name] = log
    return logs


def _weights(checkpoint: Path, role: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=role)


def _assert_same_metrics(a: list[dict], b: list[dict], keys: list[str]) -> int:
    """Every step of `a` and `b` has the same value (LOSS_RTOL) for each key present; returns values compared."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    compared, worst = 0, 0.0
    for ma, mb in zip(a, b):
        for k in keys:
            if k in ma or k in mb:
                assert ma[k] == pytest.approx(mb[k], rel=LOSS_RTOL, abs=1e-9), (ma["step"], k, ma[k], mb[k])
                worst = max(worst, abs(ma[k] - mb[k]) / max(abs(mb[k]), 1e-30))
                compared += 1
    print(f"{compared} values compared, largest relative difference {worst:.2e}")
    return compared


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    print(f"{len(a)} tensors compared, largest weight difference {worst:.2e}")
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def finetune_runs(tiny_wan, toy_data, tmp_path_factory):
    """Finetune 3 steps: sp 1 on 1 rank (batch 2) and sp 2 on 2 ranks (batch 2 per group), checkpoints at 2 and 3."""
    root = tmp_path_factory.mktemp("sp_finetune")
    outs, procs = {}, {}
    for sp, nproc in ((1, 1), (2, 2)):
        out = root / f"sp{sp}"
        recipe = write_recipe(root / f"sp{sp}.yaml", finetune_recipe(
            tiny_wan, toy_data, out, max_train_steps=3, train_batch_size=2, checkpointing_steps=2,
            gradient_checkpointing=True, trackers=[], sp_size=sp))
        procs[f"finetune sp{sp}"] = _launch(recipe, nproc)
        outs[sp] = (out, recipe)
    outs["logs"] = _run_all(procs)
    return outs


def test_finetune_sp2_equals_sp1(finetune_runs):
    (one, _), (two, _) = finetune_runs[1], finetune_runs[2]
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == 3
    assert _assert_same_metrics(m1, m2, ["student/loss", "student/grad_norm"]) == 6
    _assert_same_weights(_weights(one / "checkpoint-3", "student"), _weights(two / "checkpoint-3", "student"))
    assert "sequence parallel: 2 ranks per sample" in finetune_runs["logs"]["finetune sp2"]


def test_resume_sp2_checkpoint_with_sp1(finetune_runs, tmp_path):
    """The sp 2 run's step-2 checkpoint (2 ranks) resumes with sp 1 on 1 rank (universal checkpoint) and step 3
    then matches the uninterrupted sp 1 run."""
    import shutil

    import yaml

    (one, _), (two, recipe2) = finetune_runs[1], finetune_runs[2]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(two / "checkpoint-2", out / "checkpoint-2")
    data = yaml.safe_load(recipe2.read_text())
    data["training"].update(output_dir=str(out), sp_size=1)
    recipe = write_recipe(tmp_path / "resume.yaml", data)
    r = run_cli(train_cmd(recipe, "--resume", "latest"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [3]
    _assert_same_metrics(resumed, read_metrics(one)[2:], ["student/loss", "student/grad_norm"])
    _assert_same_weights(_weights(one / "checkpoint-3", "student"), _weights(out / "checkpoint-3", "student"))


def test_dmd2_sp2_equals_sp1(three_wans, toy_data, tmp_path):
    """DMD2 (student, teacher and critic with different weights), 4 iterations with the student stepping on even
    ones: sp 2 on 2 ranks == sp 1 on 1 rank."""
    outs, procs = {}, {}
    for sp, nproc in ((1, 1), (2, 2)):
        out = tmp_path / f"sp{sp}"
        recipe = write_recipe(tmp_path / f"sp{sp}.yaml", three_role_dmd2_recipe(
            three_wans, toy_data, out, {"generator_update_interval": 2}, max_train_steps=4, train_batch_size=2,
            data_path=str(toy_data / "text_only"), gradient_checkpointing=True, trackers=[], sp_size=sp))
        procs[f"dmd2 sp{sp}"] = _launch(recipe, nproc)
        outs[sp] = out
    _run_all(procs)
    m1, m2 = read_metrics(outs[1]), read_metrics(outs[2])
    assert len(m1) == 4
    keys = ["student/loss", "student/grad_norm", "critic/loss", "critic/grad_norm"]
    assert _assert_same_metrics(m1, m2, keys) == 12  # critic every iteration, student on 2 and 4
    for role in ("student", "critic"):
        _assert_same_weights(_weights(outs[1] / "checkpoint-4", role), _weights(outs[2] / "checkpoint-4", role))


@pytest.mark.slow  # ~1.6 min; the fp32 equalities above are the default suite's guard
def test_bf16_dmd2_sp2_tracks_one_rank(bf16_dmd2_runs, three_wans, toy_data, tmp_path):
    """The production regime (bf16, threshold 0, checkpointing, EMA; conftest's BF16_DMD2) with sp 2 on 2 ranks
    follows the 1-rank run of the same global batch within bf16 rounding (here the SP and data-parallel reductions
    round differently, so the fp32 tolerance does not apply)."""
    from conftest import BF16_DMD2, BF16_DMD2_METHOD

    out = tmp_path / "sp2"
    recipe = write_recipe(tmp_path / "sp2.yaml", three_role_dmd2_recipe(
        three_wans, toy_data, out, BF16_DMD2_METHOD, train_batch_size=2, data_path=str(toy_data / "text_only"),
        sp_size=2, **BF16_DMD2))
    _run_all({"bf16 dmd2 sp2": _launch(recipe, 2)})
    one, two = read_metrics(bf16_dmd2_runs[1]), read_metrics(out)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for k in ("student/loss", "critic/loss", "student/grad_norm", "critic/grad_norm"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=BF16_RTOL), (a["step"], k, a[k], b[k])


BF16_RTOL = 3e-2
"""bf16 losses and gradient norms, SP 2 on 2 ranks vs 1 rank (8 mantissa bits; different reduction order)."""


@pytest.mark.slow
def test_long_equivalence_sp2_equals_sp1(tiny_wan, three_wans, toy_data, tmp_path):
    """The issue's lengths: finetune 10 steps and DMD2 20 iterations, sp 2 on 2 ranks == sp 1 on 1 rank (fp32)."""
    outs, procs = {}, {}
    for sp, nproc in ((1, 1), (2, 2)):
        ft = tmp_path / f"finetune_sp{sp}"
        procs[f"finetune sp{sp}"] = _launch(write_recipe(tmp_path / f"ft{sp}.yaml", finetune_recipe(
            tiny_wan, toy_data, ft, max_train_steps=10, train_batch_size=2, gradient_checkpointing=True,
            trackers=[], sp_size=sp)), nproc)
        dm = tmp_path / f"dmd2_sp{sp}"
        procs[f"dmd2 sp{sp}"] = _launch(write_recipe(tmp_path / f"dm{sp}.yaml", three_role_dmd2_recipe(
            three_wans, toy_data, dm, {"generator_update_interval": 2}, max_train_steps=20, train_batch_size=2,
            data_path=str(toy_data / "text_only"), gradient_checkpointing=True, trackers=[], sp_size=sp)), nproc)
        outs[sp] = (ft, dm)
    _run_all(procs)
    (ft1, dm1), (ft2, dm2) = outs[1], outs[2]
    assert _assert_same_metrics(read_metrics(ft1), read_metrics(ft2), ["student/loss", "student/grad_norm"]) == 20
    keys = ["student/loss", "student/grad_norm", "critic/loss", "critic/grad_norm"]
    assert _assert_same_metrics(read_metrics(dm1), read_metrics(dm2), keys) == 60
    _assert_same_weights(_weights(ft1 / "checkpoint-10", "student"), _weights(ft2 / "checkpoint-10", "student"))
    for role in ("student", "critic"):
        _assert_same_weights(_weights(dm1 / "checkpoint-20", role), _weights(dm2 / "checkpoint-20", role))


BAD_SP = {
    "zero": (0, 2, "finetune", ["training.sp_size", "must be at least 1"]),
    "world": (3, 2, "finetune", ["training.sp_size: 3 does not divide the world size 2", "(valid here: 1, 2)"]),
    "heads": (8, 8, "finetune", ["training.sp_size: 8 does not divide the model's 4 attention heads",
                                 "(valid here: 1, 2, 4)"]),
    "tokens": (2, 2, "dmd2", ["training.sp_size: 2 does not divide the 3 tokens of a sample",
                              "training.num_frames/height/width", "(valid here: 1)"]),
    "gan": (2, 2, "gan", ["training.sp_size", "GAN term", "gan_loss_weight_gen: 0"]),
}


@pytest.mark.parametrize("name", sorted(BAD_SP))
def test_bad_sp_size_is_one_line(name, tiny_wan, toy_data, tmp_path, monkeypatch, capsys):
    """Each bad `training.sp_size` is one line naming the key (and the valid values), exit 2, nothing written."""
    from ds_distill.train import main

    sp, world, kind, fragments = BAD_SP[name]
    out = tmp_path / "out"
    if kind == "finetune":
        recipe = finetune_recipe(tiny_wan, toy_data, out, sp_size=sp)
    else:  # 1 frame of 48 x 16 pixels: 1 x 3 x 1 = 3 tokens after patching
        recipe = dmd2_recipe(tiny_wan, toy_data, out, sp_size=sp, num_frames=1, height=48, width=16)
        if kind == "gan":
            recipe["training"]["data_path"] = str(toy_data / "latents")
            recipe["method_config"]["gan_loss_weight_gen"] = 0.03
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["--config", str(write_recipe(tmp_path / "recipe.yaml", recipe))]))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not out.exists()


def _sampler_worker(out: Path) -> None:
    """2 ranks: the ODE and SDE samplers (with CFG) on a tiny Wan with and without Ulysses installed."""
    import json

    import torch
    from diffusers import WanTransformer3DModel

    from ds_distill.engines import Strategy, init_distributed
    from ds_distill.models.wan_ulysses import install_wan
    from ds_distill.samplers import denoiser_from_module, sample_latents

    strategy = Strategy(init_distributed())
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32).eval()
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # 3 x 4 x 4 = 48 tokens
    cond = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    uncond = torch.zeros_like(cond)

    def run(kind: str) -> torch.Tensor:
        with torch.no_grad():
            return sample_latents(kind, denoiser_from_module(model), noise, cond, flow_shift=3.0, num_steps=4,
                                  guidance_scale=3.0, uncond=uncond, generator=torch.Generator().manual_seed(3))

    def per_token() -> torch.Tensor:
        # Wan2.2 TI2V's form: one timestep per token ([B, N]); its embedding follows the token slice.
        t = torch.linspace(100.0, 900.0, 48).repeat(2, 1)
        with torch.no_grad():
            return model(hidden_states=noise, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]

    whole = {kind: run(kind) for kind in ("ode", "sde")}
    whole["per_token"] = per_token()
    install_wan(model, strategy.init_sequence_parallel(2))
    split = {kind: run(kind) for kind in ("ode", "sde")}
    split["per_token"] = per_token()
    result = {kind: float((split[kind] - whole[kind]).abs().max()) for kind in whole}
    result["scale"] = {kind: float(whole[kind].abs().max()) for kind in whole}
    if strategy.dist.rank == 0:
        out.write_text(json.dumps(result))
    strategy.close()


SAMPLER_ATOL = 1e-5
"""Largest absolute difference of sampled latents (values of order 1), SP 2 vs SP 1, fp32."""


def test_samplers_sp2_equal_sp1(tmp_path):
    """The ODE and SDE samplers with CFG, and a forward with per-token timesteps: Ulysses on 2 ranks == whole."""
    import json

    out = tmp_path / "samplers.json"
    r = run_cli([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(Path(__file__)), "samplers", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    print(result)
    assert result["ode"] <= SAMPLER_ATOL and result["sde"] <= SAMPLER_ATOL, result
    assert result["per_token"] <= SAMPLER_ATOL, result  # one forward with per-token timesteps (Wan2.2 TI2V)
    assert min(result["scale"].values()) > 0.1  # the latents are not trivially zero


if __name__ == "__main__" and sys.argv[1:2] == ["samplers"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    _sampler_worker(Path(sys.argv[2]))
