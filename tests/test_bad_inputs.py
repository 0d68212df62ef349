"""The table of bad inputs: each gives one `error:` line, exit code 2, no traceback, and leaves output_dir as it was.

Recipe-schema errors have their own table in test_recipes.py; this one covers data files, checkpoints to
resume, DeepSpeed templates, output folders, hostfiles and command lines. The README lists both tables.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import finetune_recipe, write_recipe
from ds_distill.utils.dataset_schema import T2V_SCHEMA, tensor_to_bytes


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with its content hash."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def precious_output(out: Path) -> None:
    """An output folder from an earlier run: a complete checkpoint, `latest`, metrics."""
    ck = out / "checkpoint-4" / "student"
    ck.mkdir(parents=True)
    (ck / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights")
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "micro_step": 4, "roles": ["student"], "method": "finetune", "complete": True}))
    (out / "latest").write_text("checkpoint-4")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')


def rows(n=8, shape=(4, 2, 4, 4), text_dim=32, latent_dtype="float32", nbytes_fix=None):
    out = []
    for i in range(n):
        lat = torch.randn(shape)
        txt = torch.randn(5, text_dim)
        b = tensor_to_bytes(lat.to(getattr(torch, latent_dtype) if latent_dtype != "float8" else torch.float32))
        out.append({"id": str(i), "vae_latent_bytes": b if nbytes_fix is None else b[:nbytes_fix],
                    "vae_latent_shape": list(shape), "vae_latent_dtype": latent_dtype,
                    "text_embedding_bytes": tensor_to_bytes(txt), "text_embedding_shape": [5, text_dim],
                    "text_embedding_dtype": "float32", "file_name": "", "caption": "c", "media_type": "video",
                    "width": 32, "height": 32, "num_frames": 5, "duration_sec": 0.3, "fps": 16.0})
    return out


def write_parquet(folder: Path, data: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(data, schema=T2V_SCHEMA), folder / "part-0.parquet")
    return folder


# Each case: (name, setup(tmp, recipe dict) -> argv for `main` (recipe path at {recipe}), which main,
#             fragments of the message).
def case_data_missing(tmp, r):
    r["training"]["data_path"] = str(tmp / "nope")
    return "train", [], ["nope", "training.data_path does not exist"]


def case_data_no_parquet(tmp, r):
    (tmp / "empty").mkdir()
    r["training"]["data_path"] = str(tmp / "empty")
    return "train", [], ["empty", "holds no .parquet files"]


def case_data_corrupt_file(tmp, r):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "part-0.parquet").write_bytes(b"PAR1 this is not parquet")
    r["training"]["data_path"] = str(tmp / "bad")
    return "train", [], ["part-0.parquet", "not a readable parquet file"]


def case_data_missing_latents(tmp, r, toy_data=None):
    r["training"]["data_path"] = str(r["_toy"] / "text_only")
    return "train", [], ["prompts.parquet", "vae_latent_bytes", "rollout_mode: simulate"]


def case_data_byte_count(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(nbytes_fix=100)))
    return "train", [], ["part-0.parquet", "row 0", "do not hold shape"]


def case_data_unknown_dtype(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(latent_dtype="float8")))
    return "train", [], ["part-0.parquet", "unsupported dtype 'float8'"]


def case_data_wrong_channels(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(shape=(16, 2, 4, 4))))
    return "train", [], ["part-0.parquet", "vae_latent_shape", "16 channels", "expects 4"]


def case_data_wrong_text_dim(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(text_dim=4096)))
    return "train", [], ["part-0.parquet", "text_embedding_shape", "4096", "text_dim is 32"]


def case_data_odd_latent_size(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(shape=(4, 2, 5, 4))))
    return "train", [], ["part-0.parquet", "H=5 is not a multiple of the patch size 2"]


def case_data_too_few_rows(tmp, r):
    r["training"]["data_path"] = str(write_parquet(tmp / "d", rows(n=2)))
    r["training"]["train_batch_size"] = 4
    return "train", [], ["2 rows, fewer than one global batch"]


def case_validation_prompts_bad_json(tmp, r):
    (tmp / "v.json").write_text("{not json")
    r["training"].update(log_validation=True, validation_dataset_file=str(tmp / "v.json"))
    return "train", [], ["v.json"]


def case_resume_missing(tmp, r):
    return "train", ["--resume", str(tmp / "no-such-checkpoint")], ["no-such-checkpoint", "does not exist"]


def case_resume_incomplete(tmp, r):
    half = Path(r["training"]["output_dir"]) / "checkpoint-9"
    (half / "student").mkdir(parents=True)
    return "train", ["--resume", str(half)], ["checkpoint-9", "not a complete checkpoint", "--resume latest"]


def case_resume_other_method(tmp, r):
    out = Path(r["training"]["output_dir"])
    state = out / "checkpoint-4" / "trainer_state.json"
    data = json.loads(state.read_text())
    state.write_text(json.dumps(dict(data, method="dmd2", roles=["critic", "student"])))
    return "train", ["--resume", "latest"], ["checkpoint-4", "written by method 'dmd2'"]


def case_resume_corrupt_state(tmp, r):
    ck = tmp / "elsewhere" / "checkpoint-3"
    (ck / "student").mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{truncated")
    return "train", ["--resume", str(ck)], ["checkpoint-3", "not a complete checkpoint"]


def case_resume_no_model_states(tmp, r):
    ck = tmp / "elsewhere" / "checkpoint-3"
    (ck / "student").mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps(
        {"step": 3, "micro_step": 3, "roles": ["student"], "method": "finetune", "complete": True}))
    return "train", ["--resume", str(ck)], ["checkpoint-3/student", "no DeepSpeed model states"]


def case_ds_template_missing(tmp, r):
    r["training"]["ds_config"] = "ds_configs/none.json"
    return "train", [], ["training.ds_config", "none.json", "not found"]


def case_ds_template_bad_json(tmp, r):
    (tmp / "bad.json").write_text('{"zero_optimization": ')
    r["roles"]["student"]["ds_config"] = str(tmp / "bad.json")
    return "train", [], ["roles.student.ds_config", "bad.json is not valid JSON"]


def case_output_dir_is_a_file(tmp, r):
    (tmp / "afile").write_text("x")
    r["training"]["output_dir"] = str(tmp / "afile")
    return "train", [], ["training.output_dir", "afile exists and is not a folder"]


def case_negative_embedding_missing(tmp, r):
    r["training"].update(uncond_embedding="negative_prompt", negative_prompt_embedding=str(tmp / "neg.safetensors"))
    r["method_config"]["training_cfg_rate"] = 0.5
    return "train", ["--dry-run"], ["training.negative_prompt_embedding", "neg.safetensors", "not found"]


def case_cli_unknown_option(tmp, r):
    return "train", ["--resum", "latest"], ["unknown option '--resum'"]


def case_cli_missing_config(tmp, r):
    return "train_raw", ["--config", str(tmp / "none.yaml")], ["none.yaml", "recipe file not found"]


def case_hostfile_missing(tmp, r):
    return "launch", ["--hostfile", str(tmp / "hosts"), "--", "--config", "{recipe}"], ["hosts", "not found"]


def case_hostfile_bad_line(tmp, r):
    (tmp / "hosts").write_text("node-a slots=8\nnode-b 8\n")
    return "launch", ["--hostfile", str(tmp / "hosts"), "--", "--config", "{recipe}"], \
        ["hosts:2", "expected `HOST slots=N`", "node-b 8"]


def case_hostfile_duplicate(tmp, r):
    (tmp / "hosts").write_text("# cluster\nnode-a slots=8\nnode-a slots=4\n")
    return "launch", ["--hostfile", str(tmp / "hosts"), "--", "--config", "{recipe}"], ["hosts:3", "listed twice"]


def case_hostfile_bad_slots(tmp, r):
    (tmp / "hosts").write_text("node-a slots=0\n")
    return "launch", ["--hostfile", str(tmp / "hosts"), "--", "--config", "{recipe}"], \
        ["hosts:1", "positive integer", "'0'"]


def case_launch_without_separator(tmp, r):
    return "launch", ["--hostfile", "h", "--config", "{recipe}"], ["usage: ds-distill launch"]


def case_cli_unknown_command(tmp, r):
    return "cli", ["distil"], ["unknown command 'distil'"]


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tiny_wan, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    precious_output(out)
    recipe = finetune_recipe(tiny_wan, toy_data, out)
    recipe["_toy"] = toy_data
    which, argv, fragments = CASES[name](tmp_path, recipe)
    recipe.pop("_toy")
    before = snapshot(out)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    argv = [a.replace("{recipe}", str(path)) for a in argv]
    if which == "train":
        from ds_distill.train import main

        argv = ["--config", str(path), *argv]
    elif which == "train_raw":
        from ds_distill.train import main
    elif which == "launch":
        from ds_distill.launch import main
    else:
        from ds_distill.cli import main
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert snapshot(out) == before  # nothing in the output folder was touched


def test_table_is_big_enough():
    from test_recipes import CASES as RECIPE_CASES

    assert len(CASES) + len(RECIPE_CASES) >= 25 and len(CASES) >= 20
