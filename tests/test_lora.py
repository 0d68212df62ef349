"""LoRA (issue 14): adapters added with diffusers' `add_adapter` on a ZeRO-3 partitioned Wan (threshold 0), only
they train (base and teacher bit-equal), checkpoints hold them alone, 2 ranks == 1 rank, and the exported
Diffusers LoRA file, loaded with `WanPipeline.load_lora_weights`, reproduces the trained model (as `--merge` does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (PYTHON, REPO, build_in_process, deepspeed_cmd, dmd2_recipe, finetune_recipe, read_metrics,
                      run_cli, train_cmd, write_recipe)
from ds_distill import export

LORA = {"rank": 4, "alpha": 8.0}
# fp32 runs: 1 rank (batch 4) and 2 ranks (2 each) differ only in summation order (~1e-7 relative); Adam turns a
# gradient's size into a step of about lr whatever it is, so adapters agree to well below one step (lr 1e-3).
ADAPTER_ATOL = 1e-5
# The exported LoRA on the base, the merged weights and the trained engine compute the same function in fp32;
# they differ by the rounding of W x + s B A x against (W + s B A) x.
OUTPUT_ATOL = 2e-5


def lora_finetune_recipe(tiny_wan: Path, toy_data: Path, out: Path, **training) -> dict:
    r = finetune_recipe(tiny_wan, toy_data, out, **training)
    r["roles"]["student"]["lora"] = dict(LORA)
    return r


def fixed_inputs(seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([700.0, 150.0]),
                encoder_hidden_states=torch.randn(2, 16, 32, generator=g), return_dict=False)


def quiet(*_a, **_k):
    return None


def base_name(name: str) -> str:
    """peft renames a wrapped layer's weight `x.weight` -> `x.base_layer.weight`."""
    return name.replace(".base_layer.", ".")


@pytest.fixture(scope="module")
def lora_runs_started(tiny_wan, toy_data, tmp_path_factory):
    """1-rank (batch 4) and 2-rank (2 each) fp32 LoRA finetunes, threshold 0, gradient checkpointing on,
    checkpoints after steps 2 and 4, started in the background."""
    root = tmp_path_factory.mktemp("lora_runs")
    procs = {}
    for nproc in (1, 2):
        out = root / f"ranks{nproc}"
        recipe = write_recipe(root / f"ranks{nproc}.yaml", lora_finetune_recipe(
            tiny_wan, toy_data, out, train_batch_size=4 // nproc, gradient_checkpointing=True,
            checkpointing_steps=2, checkpoints_total_limit=0, trackers=[]))
        cmd = train_cmd(recipe) if nproc == 1 else deepspeed_cmd(2, recipe)
        launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
        env["OMP_NUM_THREADS"] = "1"
        procs[nproc] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True), out, recipe)
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def lora_runs(lora_runs_started) -> dict[int, tuple[Path, Path]]:
    outs = {}
    for nproc, (proc, out, recipe) in lora_runs_started.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{nproc} rank(s):\n" + log[-4000:]
        outs[nproc] = (out, recipe)
    return outs


def whole(module) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 module, gathered (collective; one rank here)."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def file_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "transformer" / export.WEIGHTS_NAME))


def assert_base_unchanged(module, model_dir: Path, adapters: set[str]) -> None:
    """Every non-adapter parameter bit-equal to the role's weights on disk."""
    disk = file_weights(model_dir)
    now = whole(module)
    base = {base_name(n): t for n, t in now.items() if n not in adapters}
    assert base.keys() == disk.keys()
    for n, t in base.items():
        assert torch.equal(t, disk[n].to(t.dtype)), n


def test_lora_finetune_exports_reproduce_the_trained_model(tiny_wan, toy_data, lora_runs_started, dist_env, tmp_path):
    """fp32, 1 rank in process, threshold 0, checkpointing on: only adapters change (base bit-equal to its file),
    the checkpoint holds adapters only, and the trained engine's output is reproduced by (a) the `--lora` file loaded
    with WanPipeline.load_lora_weights on the base pipeline, (b) the `--merge` weights, (c) `sample --lora` vs
    `sample` of the merged export (same latents)."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from safetensors import safe_open

    from ds_distill.trainer import Trainer
    from ds_distill.utils.module_state import lora_parameter_names

    recipe = write_recipe(tmp_path / "r.yaml", lora_finetune_recipe(
        tiny_wan, toy_data, tmp_path / "run", max_train_steps=3, gradient_checkpointing=True, trackers=[]))
    runtime, dataset, out = build_in_process(recipe, dist_env)
    student = runtime.bundle["student"]
    adapters = set(lora_parameter_names(student.module))
    assert len(adapters) == 4 * 4 * 2 * 2  # 4 blocks x (to_q, to_k, to_v, to_out.0) x (A, B) x (attn1, attn2)
    trained = {n for n, p in student.module.named_parameters() if p.requires_grad}
    assert trained == adapters
    # threshold 0: adapters and base alike are partitioned by ZeRO-3
    assert all(hasattr(p, "ds_id") for p in student.module.parameters())
    before = whole(student.module)
    Trainer(runtime, dataset).train()
    after = whole(student.module)
    assert all(not torch.equal(before[n], after[n]) for n in adapters if ".lora_B." in n)
    assert_base_unchanged(student.module, tiny_wan, adapters)

    module = student.module.eval()
    with torch.no_grad():
        reference = module(**fixed_inputs())[0]
    role_dir = out / "checkpoint-3" / "student"
    states = torch.load(next(role_dir.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    saved = {k for g in states["param_shapes"] for k in g}
    assert saved == adapters and not states.get("frozen_param_shapes")
    assert json.loads((role_dir / "lora_config.json").read_text())["r"] == LORA["rank"]

    lora_out, merged = tmp_path / "lora", tmp_path / "merged"
    export.convert(out, lora_out, lora=True, log=quiet)
    export.convert(out, merged, merge=True, base=tiny_wan, log=quiet)
    lora_file = lora_out / export.LORA_WEIGHTS_NAME
    with safe_open(str(lora_file), "pt") as f:
        assert all(k.startswith("transformer.") and ".lora_" in k for k in f.keys())
        assert len(list(f.keys())) == len(adapters)

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    pipe.load_lora_weights(str(lora_out))
    with torch.no_grad():
        from_lora = pipe.transformer.eval()(**fixed_inputs())[0]
        from_merge = WanTransformer3DModel.from_pretrained(str(merged / "transformer")).eval()(**fixed_inputs())[0]
        base_only = WanTransformer3DModel.from_pretrained(str(tiny_wan / "transformer")).eval()(**fixed_inputs())[0]
    torch.testing.assert_close(from_lora, reference, rtol=0, atol=OUTPUT_ATOL)
    torch.testing.assert_close(from_merge, reference, rtol=0, atol=OUTPUT_ATOL)
    assert (base_only - reference).abs().max() > 100 * OUTPUT_ATOL  # the adapters matter at this tolerance

    from ds_distill import sample

    common = ["--prompt", "a cat walking on a sunny street", "--sampler", "sde", "--timesteps", "1000", "500",
              "--num-frames", "5", "--height", "32", "--width", "32", "--text-len", "16", "--save-latents"]
    assert sample.main(["--model", str(tiny_wan), "--lora", str(lora_file), "--output-dir",
                        str(tmp_path / "s_lora"), *common]) == 0
    assert sample.main(["--model", str(merged), "--output-dir", str(tmp_path / "s_merged"), *common]) == 0
    from safetensors.torch import load_file

    a = load_file(str(next((tmp_path / "s_lora").glob("*.safetensors"))))["latents"]
    b = load_file(str(next((tmp_path / "s_merged").glob("*.safetensors"))))["latents"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "s_lora" / "manifest.json").read_text())["lora"] == str(lora_file)


def adapters_of(out: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    dst = tmp / f"{out.name}-{step}"
    export.convert(out / f"checkpoint-{step}", dst, lora=True, log=quiet)
    return load_file(str(dst / export.LORA_WEIGHTS_NAME))


def test_lora_two_ranks_equal_one_rank_and_resume(lora_runs, tmp_path):
    """fp32 LoRA finetune, threshold 0: 2 ranks give the 1-rank adapters; each checkpoint holds adapters and their
    optimizer state only; the 2-rank checkpoint-2 resumes on 1 rank (universal checkpoint) to the same adapters."""
    (one, _), (two, recipe2) = lora_runs[1], lora_runs[2]
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in m1] == [1, 2, 3, 4] == [m["step"] for m in m2]
    for a, b in zip(m1, m2):
        assert a["student/loss"] == pytest.approx(b["student/loss"], rel=1e-5)
    final = {n: adapters_of(o, 4, tmp_path) for n, o in ((1, one), (2, two))}
    assert final[1].keys() == final[2].keys()
    for k in final[1]:
        torch.testing.assert_close(final[2][k], final[1][k], rtol=0, atol=ADAPTER_ATOL)
    assert any(final[1][k].abs().max() > 0 for k in final[1] if "lora_B" in k)

    # per rank: the optimizer file holds the adapters' fp32 master + two Adam moments, nothing of the base
    role = two / "checkpoint-4" / "student"
    adapter_numel = sum(v.numel() for v in final[2].values())
    for r in range(2):
        osd = torch.load(role / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                         weights_only=False)["optimizer_state_dict"]
        assert sum(g.numel() for g in osd["fp32_flat_groups"]) == adapter_numel // 2

    # resume the 2-rank checkpoint-2 on 1 rank (a copy without checkpoint-4): the same adapters at step 4
    moved = tmp_path / "moved"
    shutil.copytree(two, moved, ignore=shutil.ignore_patterns("checkpoint-4", ".run.lock"))
    (moved / "latest").write_text("checkpoint-2")
    r = yaml.safe_load(recipe2.read_text())
    r["training"]["output_dir"] = str(moved)
    r["training"]["train_batch_size"] = 4
    res = run_cli(train_cmd(write_recipe(tmp_path / "moved.yaml", r), "--resume", "latest"), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "converting to a universal checkpoint" in res.stderr
    resumed = adapters_of(moved, 4, tmp_path)
    for k in final[1]:
        torch.testing.assert_close(resumed[k], final[2][k], rtol=0, atol=ADAPTER_ATOL)


def test_lora_dmd2_bf16_trains_adapters_of_student_and_critic(tiny_wan, toy_data, dist_env, tmp_path):
    """bf16 DMD2, threshold 0, checkpointing on, EMA on: student and critic train adapters only (their bases and the
    teacher bit-equal to the file), the EMA covers the student's adapters, and the checkpoint exports with --lora
    (trained and EMA) and --merge."""
    from safetensors.torch import load_file

    from ds_distill.trainer import Trainer
    from ds_distill.utils.module_state import lora_parameter_names

    r = dmd2_recipe(tiny_wan, toy_data, tmp_path / "run", method={"ema_decay": 0.5}, max_train_steps=2,
                    train_batch_size=2, mixed_precision="bf16", gradient_checkpointing=True, trackers=[])
    r["roles"]["student"]["lora"] = dict(LORA)
    r["roles"]["critic"]["lora"] = {"rank": 2, "alpha": 2.0, "target_modules": ["to_q", "to_v", "ffn.net.2"]}
    runtime, dataset, out = build_in_process(write_recipe(tmp_path / "r.yaml", r), dist_env)
    roles = {n: runtime.bundle[n] for n in ("student", "critic", "teacher")}
    adapters = {n: set(lora_parameter_names(h.module)) for n, h in roles.items()}
    assert adapters["teacher"] == set() and len(adapters["critic"]) == 4 * (2 * 2 + 1) * 2
    ema = runtime.method.ema
    assert set(ema.names) == adapters["student"]
    before = {n: {k: v for k, v in whole(roles[n].module).items() if k in adapters[n]} for n in ("student", "critic")}
    Trainer(runtime, dataset).train()
    for n, h in roles.items():
        assert_base_unchanged(h.module, tiny_wan, adapters[n])
    for n, start in before.items():  # the adapters trained: every lora_B left its zero start
        now = whole(roles[n].module)
        moved = [k for k, v in start.items() if ".lora_B." in k and not torch.equal(now[k], v)]
        assert moved == [k for k in start if ".lora_B." in k], n
    assert (out / "checkpoint-2" / "student" / "ema").is_dir()
    files = {}
    for role, kw in (("student", {}), ("student", {"ema": True}), ("critic", {})):
        dst = tmp_path / f"{role}-{bool(kw)}"
        export.convert(out, dst, role=role, lora=True, log=quiet, **kw)
        files[role, bool(kw)] = load_file(str(dst / export.LORA_WEIGHTS_NAME))
    trained, averaged = files["student", False], files["student", True]
    assert trained.keys() == averaged.keys() and any(not torch.equal(trained[k], averaged[k]) for k in trained)
    export.convert(out, tmp_path / "merged", merge=True, base=tiny_wan, dtype="bf16", log=quiet)
    assert (tmp_path / "merged" / "model_index.json").is_file()


def lora_case(tiny_wan, toy_data, tmp_path, role: str, lora: dict):
    r = dmd2_recipe(tiny_wan, toy_data, tmp_path / "out", max_train_steps=1, trackers=[])
    r["roles"][role]["lora"] = lora
    return write_recipe(tmp_path / "r.yaml", r)


@pytest.mark.parametrize("role,lora,words", [
    ("student", {"rank": 4, "target_modules": ["to_q", "to_qq"]}, ["roles.student.lora.target_modules", "'to_qq'"]),
    ("critic", {"rank": 0}, ["roles.critic.lora.rank", "at least 1"]),
    ("teacher", {"rank": 4}, ["roles.teacher.lora", "frozen"]),
    ("student", {"rank": 4, "target_modules": ["blocks"]}, ["roles.student.lora.target_modules", "peft"]),
])
def test_bad_lora_settings_one_line(tiny_wan, toy_data, tmp_path, role, lora, words):
    """Preflight: one `error:` line naming the key, exit 2, nothing written."""
    res = run_cli(train_cmd(lora_case(tiny_wan, toy_data, tmp_path, role, lora)))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_export_refuses_wrong_lora_flag(lora_runs, tmp_path):
    """A LoRA checkpoint exported without --lora/--merge, and --lora on a checkpoint of full weights: one line each,
    exit 2, OUT not written."""
    (one, _) = lora_runs[1]
    res = run_cli([PYTHON, "tools/convert_zero_to_safetensors.py",
                   str(one), str(tmp_path / "x")])
    assert res.returncode == 2 and "holds LoRA adapters only" in res.stderr and "--lora" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    full = tmp_path / "full"
    shutil.copytree(one, full, ignore=shutil.ignore_patterns(".run.lock"))
    for f in full.glob("checkpoint-*/student/lora_config.json"):
        f.unlink()
    res = run_cli([PYTHON, "tools/convert_zero_to_safetensors.py",
                   str(full), str(tmp_path / "y"), "--lora"])
    assert res.returncode == 2 and "holds full weights, not LoRA adapters" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()


@pytest.mark.parametrize("flag", ["--merge", "--lora"])
def test_export_with_a_base_of_another_width_is_one_line(lora_runs, tmp_path, flag):
    """Adapters trained on the tiny Wan (head dim 16) exported against a base of head dim 32: one line naming the
    tensor and the fix (--base), exit 2, before anything is written (OUT does not exist)."""
    (one, _) = lora_runs[1]
    wide = tmp_path / "wide_wan"
    res = run_cli([PYTHON, "-m", "ds_distill.cli", "make-tiny-wan", str(wide), "--head-dim", "32"])
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli([PYTHON, "tools/convert_zero_to_safetensors.py", str(one), str(tmp_path / "out"), flag,
                   "--base", str(wide)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "the base model is another size" in lines[0] and "pass that model as --base" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
