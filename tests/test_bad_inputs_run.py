"""Bad inputs of a training run that preflight now catches before anything is written (issue 11): recipe values
(non-finite numbers, sizes the method generates at, flow_shift, output_dir), model folders (shard index, safetensors
headers, weights vs config), data (non-finite rows, rows past the first, inconsistent latent shapes), DeepSpeed
templates, the resume checkpoint's shapes, and the run folder's owner. Each: one `error:` line, exit 2, no
traceback, and every file of the existing run in output_dir byte-identical.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import dmd2_recipe, finetune_recipe, write_recipe
from test_bad_inputs import precious_output, rows, snapshot, write_parquet


def two_files(tmp: Path, bad_file_rows: list[dict]) -> Path:
    """A dataset folder of two parquet files: a good one and `bad_file_rows`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ds_distill.utils.dataset_schema import T2V_SCHEMA

    folder = write_parquet(tmp / "d", rows())
    pq.write_table(pa.Table.from_pylist(bad_file_rows, schema=T2V_SCHEMA), folder / "part-1.parquet")
    return folder


def poison(data: list[dict], row: int, column: str, value: float) -> list[dict]:
    """Set one element of a row's latent or text embedding to NaN/inf (bytes re-encoded, shape kept)."""
    from ds_distill.utils.dataset_schema import tensor_from_bytes, tensor_to_bytes

    r = data[row]
    t = tensor_from_bytes(r[f"{column}_bytes"], r[f"{column}_shape"], r[f"{column}_dtype"]).clone()
    t.view(-1)[3] = value
    r[f"{column}_bytes"] = tensor_to_bytes(t)
    return data


def model_copy(tmp: Path, r: dict) -> Path:
    """A private copy of the tiny Wan that a case may damage; every role points at it."""
    dst = tmp / "model"
    shutil.copytree(r["roles"]["student"]["path"], dst)
    for spec in r["roles"].values():
        spec["path"] = str(dst)
    return dst / "transformer"


# -- recipe values -----------------------------------------------------------------------------------------


def case_output_dir_empty(tmp, r):
    r["training"]["output_dir"] = ""
    return [], ["training.output_dir", "must name a folder", "current directory"]


def case_nan_learning_rate(tmp, r):
    r["training"]["learning_rate"] = float("nan")
    return [], ["training.learning_rate", "nan is not a finite number"]


def case_inf_method_knob(tmp, r):
    r["method_config"]["logit_mean"] = float("inf")
    return [], ["method_config.logit_mean", "inf is not a finite number"]


def case_nan_override(tmp, r):
    return ["training.max_grad_norm=nan"], ["training.max_grad_norm", "nan is not a finite number"]


def case_inf_in_list(tmp, r):
    r["training"]["betas"] = [0.9, float("-inf")]
    return [], ["training.betas[1]", "-inf is not a finite number"]


def case_flow_shift_zero(tmp, r):
    r["pipeline_config"]["flow_shift"] = 0
    return [], ["pipeline_config.flow_shift", "must be positive"]


def case_flow_shift_negative(tmp, r):
    r["pipeline_config"]["flow_shift"] = -3.0
    return [], ["pipeline_config.flow_shift", "must be positive"]


def case_grace_not_positive(tmp, r):
    r["training"]["preemption_grace_s"] = 0
    return [], ["training.preemption_grace_s", "must be positive"]


def case_frames_not_4k_plus_1(tmp, r):
    r.update(dmd2_recipe(Path(r["roles"]["student"]["path"]), r["_toy"], Path(r["training"]["output_dir"]),
                         num_frames=6))
    return [], ["training.num_frames", "6 is not 4*k+1", "e.g. 5"]


def case_height_not_patch_multiple(tmp, r):
    r.update(dmd2_recipe(Path(r["roles"]["student"]["path"]), r["_toy"], Path(r["training"]["output_dir"]),
                         height=40))
    return [], ["training.height", "40 is not a multiple of 16"]


def case_width_beyond_rotary_range(tmp, r):
    r.update(dmd2_recipe(Path(r["roles"]["student"]["path"]), r["_toy"], Path(r["training"]["output_dir"]),
                         width=1024))
    return [], ["training.width", "64 patches", "rope_max_seq_len 32"]


def case_num_frames_zero(tmp, r):
    r["training"]["num_frames"] = 0
    return [], ["training.num_frames", "must be at least 1"]


# -- data ----------------------------------------------------------------------------------------------------


def case_data_nan_latent(tmp, r):
    r["training"]["data_path"] = str(two_files(tmp, poison(rows(), 5, "vae_latent", float("nan"))))
    return [], ["part-1.parquet: row 5", "vae_latent holds NaN or infinite values", "not a learning-rate"]


def case_data_inf_text(tmp, r):
    r["training"]["data_path"] = str(two_files(tmp, poison(rows(), 2, "text_embedding", float("inf"))))
    return [], ["part-1.parquet: row 2", "text_embedding holds NaN or infinite values"]


def case_data_bad_row_past_the_first(tmp, r):
    data = rows()
    data[6]["vae_latent_bytes"] = data[6]["vae_latent_bytes"][:50]
    r["training"]["data_path"] = str(two_files(tmp, data))
    return [], ["part-1.parquet: row 6", "do not hold shape"]


def case_data_latent_shapes_differ(tmp, r):
    r["training"]["data_path"] = str(two_files(tmp, rows(shape=(4, 2, 8, 8))))
    return [], ["part-1.parquet", "vae_latent_shape [4, 2, 8, 8] differs from [4, 2, 4, 4]",
                "one latent size"]


# -- model folders -------------------------------------------------------------------------------------------


def case_model_shard_missing(tmp, r):
    folder = model_copy(tmp, r)
    from safetensors import safe_open

    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: ("diffusion_pytorch_model-00001-of-00002.safetensors" if i % 2 else
                      "diffusion_pytorch_model-00002-of-00002.safetensors") for i, n in enumerate(names)}
    os.rename(folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [], ["index.json", "names shard diffusion_pytorch_model-00002-of-00002.safetensors", "incomplete download"]


def case_model_weights_truncated(tmp, r):
    f = model_copy(tmp, r) / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    return [], ["diffusion_pytorch_model.safetensors", "truncated", "copy it again"]


def case_model_weights_garbage(tmp, r):
    (model_copy(tmp, r) / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    return [], ["diffusion_pytorch_model.safetensors", "not a readable safetensors file"]


def case_model_config_disagrees(tmp, r):
    cfg_path = model_copy(tmp, r) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = 128
    cfg_path.write_text(json.dumps(cfg))
    return [], ["has shape", "config.json says", "config.json and weights disagree"]


def case_model_config_not_wan(tmp, r):
    cfg_path = model_copy(tmp, r) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_attention_heads"] = "four"
    cfg_path.write_text(json.dumps(cfg))
    return [], ["roles.student.path", "config.json does not describe a Wan transformer"]


# -- DeepSpeed templates -------------------------------------------------------------------------------------


def case_template_not_an_object(tmp, r):
    (tmp / "list.json").write_text("[1, 2]")
    r["roles"]["student"]["ds_config"] = str(tmp / "list.json")
    return [], ["roles.student.ds_config", "must be a JSON object"]


def case_template_stage_2(tmp, r):
    (tmp / "z2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    r["roles"]["student"]["ds_config"] = str(tmp / "z2.json")
    return [], ["roles.student.ds_config", "zero_optimization.stage is 2", "stage 3"]


# -- the resume checkpoint -----------------------------------------------------------------------------------


def fake_checkpoint(tmp: Path, states) -> Path:
    ck = tmp / "elsewhere" / "checkpoint-3"
    (ck / "student").mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps(
        {"step": 3, "micro_step": 3, "roles": ["student"], "method": "finetune", "complete": True}))
    target = ck / "student" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if isinstance(states, bytes):
        target.write_bytes(states)
    else:
        torch.save(states, target)
    return ck


def case_resume_other_shape(tmp, r):
    ck = fake_checkpoint(tmp, {"param_shapes": [{"patch_embedding.weight": torch.Size([8, 4, 1, 2, 2])}]})
    return ["--resume", str(ck)], ["checkpoint-3/student", "patch_embedding.weight is [8, 4, 1, 2, 2]",
                                   "[64, 4, 1, 2, 2]", "another shape"]


def case_resume_unreadable_states(tmp, r):
    ck = fake_checkpoint(tmp, b"not a pickle")
    return ["--resume", str(ck)], ["zero_pp_rank_0_mp_rank_00_model_states.pt", "unreadable model states"]


# -- the run folder ------------------------------------------------------------------------------------------


def case_folder_holds_a_run(tmp, r):
    return [], ["training.output_dir holds an earlier run", "checkpoint-4", "--resume latest", "--overwrite"]


def case_overwrite_with_resume(tmp, r):
    return ["--resume", "latest", "--overwrite"], ["--overwrite and --resume exclude each other"]


def case_folder_locked_here(tmp, r):
    import socket

    lock = Path(r["training"]["output_dir"]) / ".run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "then"}))
    return ["--resume", "latest"], [f"in use by pid {os.getppid()} on this host", "wait for that run"]


def case_folder_locked_elsewhere(tmp, r):
    lock = Path(r["training"]["output_dir"]) / ".run.lock"
    lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "then"}))
    return ["--resume", "latest"], ["in use by pid 4242 on host node-17", f"delete {lock}"]


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_run_input(name, tiny_wan, toy_data, tmp_path, capsys):
    from ds_distill.train import main

    out = tmp_path / "out"
    precious_output(out)
    recipe = finetune_recipe(tiny_wan, toy_data, out)
    recipe["_toy"] = toy_data
    argv = CASES[name](tmp_path, recipe)
    argv, fragments = argv
    recipe.pop("_toy")
    before = snapshot(out)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["--config", str(path), *argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert snapshot(out) == before  # every file of the earlier run is byte-identical


@pytest.mark.parametrize("argv, fragment", [
    ([], "the following arguments are required: --config"),
    (["--config"], "argument --config: expected one argument"),
])
def test_command_line_mistakes_are_one_line(argv, fragment, capsys):
    from ds_distill.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_enough_cases():
    assert len(CASES) >= 20
