"""FastVideo users switch without rewriting: the seeds' example recipe runs as written (only its paths replaced) on
1 and 2 ranks; wandb (offline) logs the scalars and validation videos TensorBoard logs; legacy validation strings,
attn_kind, num_gpus and data mixes."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import (INFERENCE_T0, PYTHON, REPO, TRAIN_T0, deepspeed_cmd, dmd2_recipe, finetune_recipe, read_metrics,
                      run_cli, train_cmd, write_recipe)
from ds_distill.errors import RecipeError

# The example recipe of the seed design note (shared/seeds/003), verbatim: comments and all.
SEED_RECIPE = """\
recipe:
  family: wan
  method: dmd2

roles:
  student:
    path: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    trainable: true
  teacher:
    path: Wan-AI/Wan2.1-T2V-14B-Diffusers
    trainable: false
  critic:
    path: Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    trainable: true

training:
  seed: 0
  output_dir: /path/to/out
  data_path: /path/to/parquet
  max_train_steps: 4000
  train_batch_size: 1
  dataloader_num_workers: 4
  num_gpus: 8

  log_validation: true
  validation_steps: 50
  validation_dataset_file: /path/to/validation.json
  validation_sampling_steps: "8"     # legacy-style string；method 可选择覆写
  validation_guidance_scale: "5.0"   # legacy-style string；method 可选择覆写

  trackers: ["wandb"]
  tracker_project_name: my_project
  wandb_run_name: my_run

pipeline_config:
  flow_shift: 3
  sampler_kind: ode

method_config:
  rollout_mode: simulate
  dmd_denoising_steps: [999, 750, 500, 250, 0]
  generator_update_interval: 1
  real_score_guidance_scale: 1.0
  attn_kind: dense
"""

# Run length, sizes and the threshold-0 templates come as command-line overrides; the recipe text keeps its keys.
TINY = ["training.max_train_steps=2", "training.text_len=16", "training.num_frames=5", "training.height=32",
        "training.width=32", f"training.ds_config={TRAIN_T0}", f"training.ds_config_inference={INFERENCE_T0}"]
WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def seed_recipe(roles: dict[str, Path], data: Path, out: Path) -> str:
    """The seed text with only its paths replaced (its first 1.3B path is the student's, the second the critic's)."""
    text = SEED_RECIPE.replace("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(roles["student"]), 1)
    text = text.replace("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(roles["critic"]), 1)
    text = text.replace("Wan-AI/Wan2.1-T2V-14B-Diffusers", str(roles["teacher"]))
    text = text.replace("/path/to/out", str(out)).replace("/path/to/parquet", str(data / "text_only"))
    text = text.replace("/path/to/validation.json", str(data / "validation.json"))
    assert "Wan-AI" not in text and "/path/to" not in text
    return text


def wandb_records(out: Path) -> list:
    """Every record of the one offline wandb run under out/wandb, read from its .wandb file: a log of 32 KiB
    blocks, each record split into chunks with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last), after a 7-byte file header; each record is a wandb protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill to the end of the block
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(out: Path) -> dict[int, dict]:
    """step -> {key: value} of the offline run's history (values decoded from JSON)."""
    rows: dict[int, dict] = {}
    for r in wandb_records(out):
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def wandb_run_info(out: Path):
    (run,) = [r.run for r in wandb_records(out) if r.WhichOneof("record_type") == "run"]
    return run


def wandb_videos(out: Path, history: dict[int, dict]) -> dict[str, list[tuple[int, Path]]]:
    """tag -> [(step, media file)] of the videos in the history."""
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    videos: dict[str, list] = {}
    for step, row in sorted(history.items()):
        for key, value in row.items():
            if key.endswith("/_type") and value == "video-file":
                tag = key[: -len("/_type")]
                videos.setdefault(tag, []).append((step, run_dir / "files" / row[f"{tag}/path"]))
    return videos


def scalars_of(history: dict[int, dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, row in history.items():
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)) and "/" in key and \
                    not key.startswith("validation/"):
                out.setdefault(key, {})[step] = float(value)
    return out


# -- the seeds' recipe ----------------------------------------------------------------------------


def test_seed_recipe_runs_on_1_and_2_ranks(three_wans, toy_data, tmp_path):
    """The seed's recipe text, paths replaced, trains 2 iterations (bf16, ZeRO-3 threshold 0, three roles with
    different weights) on 1 and on 2 ranks with num_gpus set to match; wandb logs offline into the run folder."""
    procs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        recipe = tmp_path / f"seed{nproc}.yaml"
        recipe.write_text(seed_recipe(three_wans, toy_data, out), encoding="utf-8")
        args = [*TINY, f"training.num_gpus={nproc}"]
        cmd = train_cmd(recipe, *args) if nproc == 1 else deepspeed_cmd(2, recipe, *args)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", **WANDB_OFFLINE)
        procs[nproc] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True), out)
    for nproc, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{nproc} rank(s):\n{log[-4000:]}"
        assert f"({nproc} rank{'s' if nproc > 1 else ''}, cpu, bf16)" in log
        metrics = read_metrics(out)
        assert [m["step"] for m in metrics] == [1, 2]
        for m in metrics:  # generator_update_interval 1: the student steps every iteration
            assert math.isfinite(m["student/loss"]) and math.isfinite(m["critic/loss"])
        saved = (out / "recipe.yaml").read_text()
        assert "attn_kind: dense" in saved and "dmd_denoising_steps: [999, 750, 500, 250, 0]" in saved
        # validation before the first step: the 4 toy prompts with the student's 4-step schedule (the 0 dropped)
        manifest = json.loads((out / "validation" / "step-0" / "manifest.json").read_text())
        assert manifest["sampling_timesteps"] == [999.0, 750.0, 500.0, 250.0] and len(manifest["videos"]) == 4
        # the offline wandb run: project and name from the recipe, the same scalars as metrics.jsonl, the videos
        run = wandb_run_info(out)
        assert (run.project, run.display_name) == ("my_project", "my_run")
        history = wandb_history(out)
        logged = scalars_of(history)
        for m in metrics:
            for key in ("student/loss", "critic/loss", "student/lr", "critic/grad_norm"):
                assert logged[key][m["step"]] == pytest.approx(m[key], rel=1e-9, abs=0)
        videos = wandb_videos(out, history)
        assert len(videos) == 4 and all(steps == [0] for steps in
                                        ([s for s, _ in v] for v in videos.values()))
        assert all(path.is_file() and path.stat().st_size > 1000 for v in videos.values() for _, path in v)
        assert not (out / "logs").exists()  # tensorboard was not asked for


def test_num_gpus_other_than_the_launch_is_one_line(three_wans, toy_data, tmp_path):
    """The seed's num_gpus: 8 launched on one process: one line naming the key and both counts, exit 2, nothing
    written."""
    out = tmp_path / "out"
    recipe = tmp_path / "seed.yaml"
    recipe.write_text(seed_recipe(three_wans, toy_data, out), encoding="utf-8")
    result = run_cli(train_cmd(recipe, *TINY), env=WANDB_OFFLINE, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "training.num_gpus" in lines[0] and "for 8 rank(s)" in lines[0] and "this launch has 1" in lines[0]
    assert not out.exists()


def test_wandb_without_the_package_is_one_line(three_wans, toy_data, tmp_path):
    """trackers: [wandb] where wandb cannot be imported: one line saying how to install it, exit 2."""
    recipe = tmp_path / "seed.yaml"
    recipe.write_text(seed_recipe(three_wans, toy_data, tmp_path / "out"), encoding="utf-8")
    code = ("import sys; sys.modules['wandb'] = None; from ds_distill.train import main; "
            f"sys.exit(main(['--config', {str(recipe)!r}, '--print-config']))")
    result = run_cli([PYTHON, "-c", code], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.trackers: wandb is not installed" in lines[0] and "pip install wandb" in lines[0]


def test_wandb_without_a_login_stops_before_anything_is_written(tiny_wan, toy_data, tmp_path):
    """Online wandb with no API key: one line saying what to do, exit 2, the run folder left empty."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "ft.yaml", finetune_recipe(tiny_wan, toy_data, out, max_train_steps=1,
                                                                trackers=["wandb"]))
    env = {"HOME": str(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    result = run_cli(train_cmd(recipe), env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training.trackers: wandb could not start a run") and "WANDB_MODE=offline" in last
    assert "Traceback" not in result.stderr and not any(out.iterdir())


# -- wandb next to TensorBoard --------------------------------------------------------------------


def test_wandb_history_holds_the_tensorboard_scalars_and_videos(tiny_wan, toy_data, tmp_path):
    """One finetune run with both trackers and a two-count legacy validation string ("1,2"): wandb's offline
    history holds every TensorBoard scalar at the same steps (float32 tolerance: TensorBoard stores float32), and
    the same validation videos (one per step count, prompt and validation step) as mp4 media files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"data": [{"caption": "a red ball bouncing on the floor"}]}))
    recipe = write_recipe(tmp_path / "ft.yaml", finetune_recipe(
        tiny_wan, toy_data, out, max_train_steps=2, mixed_precision="bf16", trackers=["tensorboard", "wandb"],
        tracker_project_name="compat", wandb_run_name="both", log_validation=True, validation_steps=2,
        validation_dataset_file=str(prompts), validation_sampling_steps="1,2", validation_guidance_scale="3.0"))
    result = run_cli(train_cmd(recipe), env=WANDB_OFFLINE, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    acc = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    history = wandb_history(out)
    logged = scalars_of(history)
    assert sorted(logged) == sorted(tb) and "student/loss" in tb and "perf/step_time_s" in tb
    for tag, values in tb.items():
        assert sorted(logged[tag]) == sorted(values) == [1, 2]
        for step, value in values.items():
            assert logged[tag][step] == pytest.approx(value, rel=2e-7, abs=1e-12), tag

    names = [f"validation/steps-{k}/0-a-red-ball-bouncing-on-the-floor" for k in (1, 2)]
    tb_videos = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    videos = wandb_videos(out, history)
    assert sorted(tb_videos) == sorted(videos) == names
    for tag in names:
        assert tb_videos[tag] == [s for s, _ in videos[tag]] == [0, 2]
        for step, media in videos[tag]:
            k = tag.split("/")[1]
            written = out / "validation" / f"step-{step}" / k / "0-a-red-ball-bouncing-on-the-floor.mp4"
            assert media.suffix == ".mp4" and media.read_bytes() == written.read_bytes()
    for step in (0, 2):
        for k in (1, 2):
            manifest = json.loads((out / "validation" / f"step-{step}" / f"steps-{k}" / "manifest.json").read_text())
            assert (manifest["sampling_steps"], manifest["guidance_scale"]) == (k, 3.0)


# -- recipe keys ----------------------------------------------------------------------------------


def load(tmp_path: Path, tiny_wan, toy_data, **training):
    from ds_distill.utils.config import load_recipe

    return load_recipe(write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, tmp_path / "o",
                                                                         **training)))


@pytest.mark.parametrize("value,counts", [("8", [8]), ("4,8", [4, 8]), (8, [8]), ([2, 3], [2, 3])])
def test_validation_sampling_steps_spellings(value, counts, tiny_wan, toy_data, tmp_path):
    recipe = load(tmp_path, tiny_wan, toy_data, validation_sampling_steps=value, validation_guidance_scale="5.0")
    assert recipe.training.validation_sampling_steps == counts
    assert recipe.training.validation_guidance_scale == 5.0


@pytest.mark.parametrize("training,method,expected", [
    ({"validation_sampling_steps": "8,x"}, {}, "training.validation_sampling_steps: expected step counts"),
    ({"validation_sampling_steps": "0"}, {}, "training.validation_sampling_steps: every step count must be at least 1"),
    ({"validation_guidance_scale": "5,7"}, {}, "training.validation_guidance_scale: expected a number"),
    ({}, {"attn_kind": "vsa"}, "method_config.attn_kind: 'vsa' is not available (attention kinds: dense)"),
    ({"num_gpus": 0}, {}, "training.num_gpus: must be at least 1"),
    ({"trackers": ["wandb", "none"]}, {}, "training.trackers: `none` cannot be combined"),
    ({"trackers": ["mlflow"]}, {}, "unknown tracker 'mlflow' (available: tensorboard, wandb, none)"),
    ({"data_path": {}}, {}, "training.data_path: the mapping is empty"),
    ({"data_path": {"a": 0}}, {}, "training.data_path.a: repeat count 0 must be at least 1"),
    ({"data_path": {"a": "x"}}, {}, "training.data_path.a: expected an integer, got 'x'"),
    ({"data_path": 3}, {}, "training.data_path: expected a string or a list or a mapping of integers, got 3"),
])
def test_bad_new_keys_are_one_line(training, method, expected, tiny_wan, toy_data, tmp_path):
    from ds_distill.dispatch import check_recipe
    from ds_distill.utils.config import load_recipe

    r = finetune_recipe(tiny_wan, toy_data, tmp_path / "o", **training)
    r["method_config"].update(method)
    with pytest.raises(RecipeError) as err:
        check_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", r)))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_attn_kind_is_accepted_by_every_method_and_printed_back(tiny_wan, toy_data, tmp_path):
    from ds_distill.dispatch import check_recipe
    from ds_distill.utils.config import dump_recipe, load_recipe

    for method, make in (("finetune", finetune_recipe), ("dmd2", dmd2_recipe)):
        r = make(tiny_wan, toy_data, tmp_path / "o")
        r["method_config"]["attn_kind"] = "dense"
        recipe = load_recipe(write_recipe(tmp_path / f"{method}.yaml", r))
        check_recipe(recipe)
        assert recipe.attn_kind == "dense" and "attn_kind" not in recipe.method_config
        assert "attn_kind: dense" in dump_recipe(recipe)


def test_train_names_the_import_command_for_a_fastvideo_config(tmp_path):
    path = tmp_path / "fv.yaml"
    path.write_text("models:\n  student: {_target_: fastvideo.train.models.wan.WanModel, init_from: x}\n"
                    "method: {_target_: fastvideo.train.methods.fine_tuning.finetune.FineTuneMethod}\n")
    result = run_cli([PYTHON, "-m", "ds_distill.train", "--config", str(path), "--print-config"], timeout=60)
    assert result.returncode == 2
    assert f"ds-distill import-recipe {path} OUT.yaml" in result.stderr and len(result.stderr.splitlines()) == 1


# -- data mixes -----------------------------------------------------------------------------------


def write_text_only(path: Path, rows: int, tag: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ds_distill.utils.dataset_schema import TEXT_ONLY_SCHEMA

    emb = torch.zeros(3, 32)
    table = pa.Table.from_pylist([{"id": f"{tag}{i}", "text_embedding_bytes": emb.numpy().tobytes(),
                                   "text_embedding_shape": [3, 32], "text_embedding_dtype": "float32",
                                   "caption": f"{tag}{i}"} for i in range(rows)], schema=TEXT_ONLY_SCHEMA)
    path.mkdir(parents=True)
    pq.write_table(table, path / "part.parquet", row_group_size=4)
    return path


def test_mixed_data_path_draws_in_proportion_to_rows_times_repeat(tiny_wan, toy_data, tmp_path):
    """{A: 3, B: 1} with 5 and 7 rows: over one epoch (2 ranks x 1 per rank) each A row comes 3 times and each B row
    once, so A makes 15 of the 22 draws -- rows x repeat count, exactly."""
    from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

    a, b = write_text_only(tmp_path / "A", 5, "a"), write_text_only(tmp_path / "B", 7, "b")
    recipe = load(tmp_path, tiny_wan, toy_data, data_path={str(a): 3, str(b): 1})
    assert recipe.training.data_path == {str(a): 3, str(b): 1}
    dataset = ParquetDataset(recipe.training.data_path, text_len=4, need_latents=False)
    assert len(dataset) == 5 * 3 + 7 * 1
    drawn: Counter = Counter()
    loaders = [TrainLoader(dataset, 1, rank, 2, seed=0) for rank in (0, 1)]
    for _ in range(len(dataset) // 2):  # one epoch of global batches
        for loader in loaders:
            drawn.update(next(loader)["caption"])
    assert drawn == Counter({**{f"a{i}": 3 for i in range(5)}, **{f"b{i}": 1 for i in range(7)}})
    # the next epoch is another order of the same multiset
    second: Counter = Counter()
    for _ in range(len(dataset) // 2):
        for loader in loaders:
            second.update(next(loader)["caption"])
    assert second == drawn
