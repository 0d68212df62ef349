"""`ds-distill import-recipe`: FastVideo `fastvideo/train` run configs (written here in FastVideo's documented layout)
become schema-v2 recipes that pass `--dry-run`; keys without a counterpart are listed one line each, never dropped;
bad inputs are one line, exit 2, nothing written."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, train_cmd

WAN = "fastvideo.train.models.wan.WanModel"


def fastvideo_finetune(model: Path, data: Path, out: Path) -> dict:
    """FastVideo's SFT layout: one student, FineTuneMethod, typed training sections, callbacks."""
    return {
        "models": {"student": {"_target_": WAN, "init_from": str(model), "trainable": True}},
        "method": {"_target_": "fastvideo.train.methods.fine_tuning.finetune.FineTuneMethod", "attn_kind": "dense"},
        "training": {
            "distributed": {"num_gpus": 1, "sp_size": 1, "tp_size": 1, "hsdp_replicate_dim": 1, "hsdp_shard_dim": 1},
            "data": {"data_path": {str(data / "latents"): 2}, "dataloader_num_workers": 0, "train_batch_size": 2,
                     "training_cfg_rate": 0.1, "seed": 7, "num_height": 32, "num_width": 32, "num_frames": 5,
                     "num_latent_t": 2},
            "optimizer": {"learning_rate": 1.0e-4, "betas": "0.9,0.99", "weight_decay": 0.0,
                          "lr_scheduler": "cosine", "lr_warmup_steps": 2},
            "loop": {"max_train_steps": 3, "gradient_accumulation_steps": 2},
            "checkpoint": {"output_dir": str(out), "training_state_checkpointing_steps": 2,
                           "checkpoints_total_limit": 1},
            "tracker": {"trackers": ["tensorboard"], "project_name": "ft"},
            "model": {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                      "enable_gradient_checkpointing_type": "full"},
            "vsa": {"sparsity": 0.9},
        },
        "callbacks": {
            "grad_clip": {"_target_": "fastvideo.train.callbacks.grad_clip.GradNormClipCallback", "max_grad_norm": 0.5},
            "validation": {"_target_": "fastvideo.train.callbacks.validation.ValidationCallback",
                           "pipeline_target": "fastvideo.pipelines.basic.wan.wan_pipeline.WanPipeline",
                           "dataset_file": str(data / "validation.json"), "every_steps": 2, "sampling_steps": [2, 4],
                           "guidance_scale": 5.0},
            "latent_vis": {"every_steps": 10},
        },
        "pipeline": {"flow_shift": 5},
    }


def fastvideo_dmd2(model: Path, data: Path, out: Path) -> dict:
    """FastVideo's DMD2 layout (examples/train/configs/distribution_matching/wan/dmd2_t2v.yaml's shape)."""
    role = {"_target_": WAN, "init_from": str(model)}
    return {
        "models": {"student": {**role, "trainable": True},
                   "teacher": {**role, "trainable": False, "disable_custom_init_weights": True},
                   "critic": {**role, "trainable": True, "disable_custom_init_weights": True}},
        "method": {"_target_": "fastvideo.train.methods.distribution_matching.dmd2.DMD2Method",
                   "rollout_mode": "simulate", "generator_update_interval": 5, "real_score_guidance_scale": 4.5,
                   "dmd_denoising_steps": [1000, 750, 500, 250], "fake_score_learning_rate": 8.0e-6,
                   "fake_score_betas": [0.0, 0.999], "fake_score_lr_scheduler": "constant",
                   "cfg_uncond": {"text": "zero"}, "student_sample_type": "sde"},
        "training": {
            "distributed": {"num_gpus": 1, "sp_size": 1, "tp_size": 1, "hsdp_replicate_dim": 1, "hsdp_shard_dim": 1},
            "data": {"data_path": str(data / "text_only"), "dataloader_num_workers": 0, "train_batch_size": 1,
                     "training_cfg_rate": 0.0, "seed": 1000, "num_height": 32, "num_width": 32, "num_frames": 5},
            "optimizer": {"learning_rate": 2.0e-6, "betas": [0.0, 0.999], "weight_decay": 0.01,
                          "lr_scheduler": "constant", "lr_warmup_steps": 0},
            "loop": {"max_train_steps": 4000, "gradient_accumulation_steps": 1},
            "checkpoint": {"output_dir": str(out), "training_state_checkpointing_steps": 20,
                           "checkpoints_total_limit": 3},
            "tracker": {"project_name": "distillation_wan", "run_name": "wan2.1_dmd2_4steps"},
            "model": {"enable_gradient_checkpointing_type": "full", "enable_torch_compile": True},
        },
        "callbacks": {
            "grad_clip": {"max_grad_norm": 1.0},
            "validation": {"pipeline_target": "fastvideo.pipelines.basic.wan.wan_dmd_pipeline.WanDMDPipeline",
                           "dataset_file": str(data / "validation.json"), "every_steps": 50, "sampling_steps": [4],
                           "sampling_timesteps": [1000, 750, 500, 250], "guidance_scale": 6.0},
            "ema": {"_target_": "fastvideo.train.callbacks.ema.EMACallback", "decay": 0.98, "start_iter": 0},
        },
        "pipeline": {"flow_shift": 8},
    }


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def import_cli(src: Path, out: Path, *extra: str) -> Result:
    """`ds-distill import-recipe SRC OUT ...` through the console script's entry point, in this process."""
    import contextlib
    import io

    from ds_distill.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(["import-recipe", str(src), str(out), *extra])
        except SystemExit as exc:
            code = exc.code
    return Result(code, stdout.getvalue(), stderr.getvalue())


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def listed(stdout: str) -> dict[str, str]:
    """The `key: value -- what to do` lines the import printed, by key."""
    lines = [ln.strip() for ln in stdout.splitlines() if " -- " in ln]
    return {ln.split(":", 1)[0]: ln for ln in lines}


def imported(src: Path, out: Path) -> tuple:
    """Import a FastVideo recipe: (the finished command, the recipe it wrote)."""
    result = import_cli(src, out)
    assert result.returncode == 0, result.stderr
    return result, yaml.safe_load(out.read_text())


def dry_runs(recipe: Path) -> None:
    """`ds-distill train --dry-run` accepts the recipe."""
    dry = run_cli(train_cmd(recipe, "--dry-run"), timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "dry run: recipe, roles, engines and data are ready" in dry.stdout


def test_finetune_imports_and_dry_runs(tiny_wan, toy_data, tmp_path):
    src = write(tmp_path / "fv_finetune.yaml", fastvideo_finetune(tiny_wan, toy_data, tmp_path / "run"))
    out = tmp_path / "finetune.yaml"
    result, recipe = imported(src, out)
    t, m = recipe["training"], recipe["method_config"]
    assert recipe["recipe"] == {"family": "wan", "method": "finetune"}
    assert recipe["roles"] == {"student": {"path": str(tiny_wan), "trainable": True}}
    assert t["data_path"] == {str(toy_data / "latents"): 2}
    assert (t["num_gpus"], t["train_batch_size"], t["gradient_accumulation_steps"], t["seed"]) == (1, 2, 2, 7)
    assert (t["num_frames"], t["height"], t["width"]) == (5, 32, 32)
    assert (t["learning_rate"], t["betas"], t["lr_scheduler"], t["lr_warmup_steps"]) == (1e-4, [0.9, 0.99],
                                                                                          "cosine", 2)
    assert (t["checkpointing_steps"], t["checkpoints_total_limit"], t["max_grad_norm"]) == (2, 1, 0.5)
    assert (t["log_validation"], t["validation_steps"], t["validation_sampling_steps"],
            t["validation_guidance_scale"]) == (True, 2, [2, 4], 5.0)
    assert t["gradient_checkpointing"] is True and t["trackers"] == ["tensorboard"]
    assert m == {"training_cfg_rate": 0.1, "weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                 "attn_kind": "dense"}
    assert recipe["pipeline_config"] == {"flow_shift": 5.0}
    # what has no counterpart is listed, one line per key, with what to do; and kept in the file's header
    lines = listed(result.stdout)
    assert sorted(lines) == sorted([
        "training.distributed.hsdp_replicate_dim", "training.distributed.hsdp_shard_dim",
        "training.data.num_latent_t", "training.vsa.sparsity", "callbacks.validation.pipeline_target",
        "callbacks.latent_vis"])
    assert "video sparse attention is not available" in lines["training.vsa.sparsity"]
    assert "callbacks.latent_vis: {every_steps: 10} -- this callback has no counterpart here" in \
        lines["callbacks.latent_vis"]
    header = [ln for ln in out.read_text().splitlines() if ln.startswith("#   ")]
    assert sorted(ln[4:] for ln in header) == sorted(lines.values())

    dry_runs(out)
    assert not (tmp_path / "run").exists()


def test_dmd2_imports_and_dry_runs(tiny_wan, toy_data, tmp_path):
    src = write(tmp_path / "fv_dmd2.yaml", fastvideo_dmd2(tiny_wan, toy_data, tmp_path / "run"))
    out = tmp_path / "dmd2.yaml"
    result, recipe = imported(src, out)
    t, m = recipe["training"], recipe["method_config"]
    assert recipe["recipe"] == {"family": "wan", "method": "dmd2"}
    assert {n: r["trainable"] for n, r in recipe["roles"].items()} == {"student": True, "teacher": False,
                                                                       "critic": True}
    assert m == {"ema_decay": 0.98, "ema_start_step": 0, "rollout_mode": "simulate", "generator_update_interval": 5,
                 "real_score_guidance_scale": 4.5, "dmd_denoising_steps": [1000, 750, 500, 250],
                 "warp_denoising_step": False, "critic_learning_rate": 8e-6, "critic_betas": [0.0, 0.999]}
    assert t["uncond_embedding"] == "zeros" and t["learning_rate"] == 2e-6 and t["betas"] == [0.0, 0.999]
    # FastVideo logs to wandb when no trackers are listed
    assert (t["trackers"], t["tracker_project_name"], t["wandb_run_name"]) == (["wandb"], "distillation_wan",
                                                                               "wan2.1_dmd2_4steps")
    assert recipe["pipeline_config"] == {"flow_shift": 8.0}
    lines = listed(result.stdout)
    assert "method.student_sample_type" in lines and "remove it or set the matching knob" in \
        lines["method.student_sample_type"]
    assert "training.model.enable_torch_compile" in lines and "callbacks.validation.sampling_timesteps" in lines
    assert "method.fake_score_lr_scheduler" not in lines  # the same schedule as the student's: nothing lost

    dry_runs(out)


def test_sequence_parallel_and_schedules_without_counterpart_are_listed(tiny_wan, toy_data, tmp_path):
    """FastVideo runs sequence parallel over all GPUs when sp_size is unset; that, a polynomial schedule and a
    sparse attention kind are each one line saying what the imported recipe does instead; a given sp_size is kept."""
    from ds_distill.import_recipe import import_recipe

    fv = fastvideo_finetune(tiny_wan, toy_data, tmp_path / "run")
    fv["training"]["distributed"] = {"num_gpus": 8}
    fv["training"]["optimizer"]["lr_scheduler"] = "polynomial"
    fv["method"]["attn_kind"] = "vsa"
    recipe, notes = import_recipe(fv, "fv.yaml")
    by_key = {n.split(":", 1)[0]: n for n in notes}
    assert "unset (= num_gpus 8)" in by_key["training.distributed.sp_size"]
    assert "set training.sp_size: 8 to split each video" in by_key["training.distributed.sp_size"]
    assert "sp_size" not in recipe["training"]
    assert "the imported recipe uses constant" in by_key["training.optimizer.lr_scheduler"]
    assert "only dense attention" in by_key["method.attn_kind"]
    assert "lr_scheduler" not in recipe["training"] and "attn_kind" not in recipe["method_config"]
    fv["training"]["distributed"] = {"num_gpus": 8, "sp_size": 4}  # given: carried over
    recipe, notes = import_recipe(fv, "fv.yaml")
    assert recipe["training"]["sp_size"] == 4 and not [n for n in notes if "sp_size" in n]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case,expected", [
    ("exists", "OUT_YAML {out}: file exists; pass --overwrite"),
    ("unknown_method", "method._target_: my.Method has no counterpart here (methods: DMD2Method (dmd2)"),
    ("unknown_model", "models.student._target_: fastvideo.train.models.ltx2.LTX2Model has no counterpart here"),
    ("schema_v2", "not FastVideo's fastvideo/train layout"),
    ("no_output_dir", "training.checkpoint.output_dir: required key is missing"),
    ("word_for_number", "training.distributed.num_gpus: expected an integer, got 'eight'"),
    ("three_betas", "training.optimizer.betas: expected two numbers (a list or \"b1,b2\"), got '0.9,0.99,0.5'"),
])
def test_bad_imports_are_one_line(case, expected, tiny_wan, toy_data, tmp_path):
    fv = fastvideo_finetune(tiny_wan, toy_data, tmp_path / "run")
    out = tmp_path / "out.yaml"
    if case == "exists":
        out.write_text("keep me\n")
    elif case == "unknown_method":
        fv["method"]["_target_"] = "my.Method"
    elif case == "unknown_model":
        fv["models"]["student"]["_target_"] = "fastvideo.train.models.ltx2.LTX2Model"
    elif case == "schema_v2":
        fv = {"recipe": {"family": "wan", "method": "finetune"}, "roles": {}}
    elif case == "no_output_dir":
        del fv["training"]["checkpoint"]["output_dir"]
    elif case == "word_for_number":
        fv["training"]["distributed"]["num_gpus"] = "eight"
    elif case == "three_betas":
        fv["training"]["optimizer"]["betas"] = "0.9,0.99,0.5"
    src = write(tmp_path / "fv.yaml", fv)
    before = digest(out) if out.exists() else None
    result = import_cli(src, out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert expected.format(out=out) in lines[0]
    assert (digest(out) if out.exists() else None) == before
    if case == "exists":  # --overwrite replaces it
        assert import_cli(src, out, "--overwrite").returncode == 0
        assert yaml.safe_load(out.read_text())["recipe"]["method"] == "finetune"


def test_next_command_launches_as_many_ranks_as_num_gpus(tiny_wan, toy_data, tmp_path):
    """The printed dry-run command must pass train's num_gpus check: a multi-GPU recipe is launched with DeepSpeed."""
    fv = fastvideo_finetune(tiny_wan, toy_data, tmp_path / "run")
    fv["training"]["distributed"]["num_gpus"] = 2
    out = tmp_path / "out.yaml"
    result, _ = imported(write(tmp_path / "fv.yaml", fv), out)
    assert f"next: deepspeed --num_gpus 2 --module ds_distill.train --config {out} --dry-run" in result.stdout
