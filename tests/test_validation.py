"""Validation: prompt files, and real training runs (subprocesses) that write mp4 files and TensorBoard videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import deepspeed_cmd, dmd2_recipe, finetune_recipe, run_cli, write_recipe
from ds_distill.errors import DataError
from ds_distill.validators.prompts import load_prompts, pad_embedding, slugify

PROMPTS = [  # two sizes, so per-prompt sizes are exercised
    {"caption": "a red ball bouncing on the floor", "num_inference_steps": 50, "height": 64, "width": 64,
     "num_frames": 5},
    {"caption": "a blue cube spinning in space", "height": 32, "width": 48, "num_frames": 9},
    {"caption": "a green wave rolling over sand"},  # size from the recipe: 64x64, 5 frames
]




def write_prompts(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"data": entries}))
    return path


def read_mp4(path: Path) -> np.ndarray:
    """Decode an mp4 with PyAV: uint8 frames [T, H, W, 3]."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def tensorboard_videos(log_dir: Path) -> dict[str, list]:
    """tag -> image events (TensorBoard stores add_video as an animated GIF image summary)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


# -- prompt files ---------------------------------------------------------------------------------


def test_json_prompts(toy_data):
    prompts = load_prompts(toy_data / "validation.json")
    assert [p.caption for p in prompts][:2] == ["a red ball bouncing on the floor", "a blue cube spinning in space"]
    assert (prompts[0].height, prompts[0].width, prompts[0].num_frames, prompts[0].num_inference_steps) == \
        (32, 32, 5, 50)
    assert all(p.embedding is None for p in prompts)


def test_parquet_prompts_carry_embeddings(toy_data):
    prompts = load_prompts(toy_data / "text_only" / "prompts.parquet")
    assert len(prompts) == 64
    assert prompts[0].caption == "a red ball bouncing on the floor"
    assert prompts[0].embedding.dim() == 2 and prompts[0].embedding.shape[1] == 32
    padded = pad_embedding(prompts[0].embedding, 16)
    assert padded.shape == (16, 32)
    latents = load_prompts(toy_data / "latents")  # a folder of T2V parquet files also works
    assert latents[0].height == 32 and latents[0].num_frames == 5
    assert slugify("A red ball -- bouncing!") == "a-red-ball-bouncing" and slugify("???") == "prompt"


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ('{"prompts": []}', "expected an object with a `data` list"),
        ('{"data": []}', "data: the list of prompts is empty"),
        ('{"data": ["a cat"]}', "data[0]: expected an object with a `caption`"),
        ('{"data": [{"caption": "ok"}, {"caption": ""}]}', "data[1].caption: expected a non-empty string"),
        ('{"data": [{"caption": "ok", "height": -64}]}', "data[0].height: expected a positive integer, got -64"),
        ('{"data": [{"caption": "ok", "num_frames": "five"}]}', "data[0].num_frames: expected a positive integer"),
    ],
)
def test_bad_json_prompt_files(tmp_path, content, expected):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_bad_prompt_files_of_other_kinds(tmp_path, toy_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {tmp_path / "missing.json": "not found", tmp_path / "prompts.txt": "must be a .json file"}
    (tmp_path / "prompts.txt").write_text("a cat")
    no_caption = tmp_path / "no_caption.parquet"
    table = pq.read_table(toy_data / "text_only" / "prompts.parquet").drop(["caption"])
    pq.write_table(table, no_caption)
    cases[no_caption] = "missing column(s) caption"
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    cases[garbage] = "not a readable parquet file"
    short = tmp_path / "short.parquet"
    row = pq.read_table(toy_data / "text_only" / "prompts.parquet").slice(0, 1).to_pylist()[0]
    row["text_embedding_bytes"] = row["text_embedding_bytes"][:-4]
    pq.write_table(pa.Table.from_pylist([row]), short)
    cases[short] = "row 0: text_embedding"
    for path, expected in cases.items():
        with pytest.raises(DataError) as info:
            load_prompts(path)
        assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_video_sizes_are_checked(tmp_path, tiny_wan):
    from ds_distill.models.components import read_components
    from ds_distill.validators.wan import check_video_sizes

    comps = read_components(tiny_wan)
    prompts = load_prompts(write_prompts(tmp_path / "p.json", [
        {"caption": "ok", "height": 64, "width": 64, "num_frames": 5},
        {"caption": "bad", "height": 72, "width": 64, "num_frames": 5},
    ]))
    with pytest.raises(DataError, match=r"p\.json: data\[1\]\.height: 72 is not a multiple of 16"):
        check_video_sizes(prompts, comps.vae_config, [1, 2, 2], tmp_path / "p.json")
    prompts[1].height, prompts[1].num_frames = 64, 6
    with pytest.raises(DataError, match=r"data\[1\]\.num_frames: 6 is not 4\*k\+1 \(e.g. 5\)"):
        check_video_sizes(prompts, comps.vae_config, [1, 2, 2], tmp_path / "p.json")


# -- real runs ------------------------------------------------------------------------------------


def check_step_folder(folder: Path, count: int) -> list[Path]:
    """mp4 files that PyAV reads back with each prompt's frame count and size."""
    videos = sorted(folder.glob("*.mp4"), key=lambda p: int(p.name.split("-")[0]))
    assert [int(p.name.split("-")[0]) for p in videos] == list(range(count)), videos
    sizes = [(5, 64, 64), (9, 32, 48), (5, 64, 64)]
    for path, (frames, height, width) in zip(videos, sizes):
        video = read_mp4(path)
        assert video.shape == (frames, height, width, 3), (path, video.shape)
        assert video.std() > 1.0  # a picture, not a flat fill
    assert videos[0].name == "0-a-red-ball-bouncing-on-the-floor.mp4"
    return videos


def build_finetune(tiny_wan, toy_data, tmp_path, strategy, **training):
    """Recipe -> runtime (a real ZeRO-3 engine in this process) and its validator, as train.py builds them."""
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.utils.config import load_recipe

    training = {"height": 64, "width": 64, **training}  # prompts without a size take the recipe's
    recipe = finetune_recipe(tiny_wan, toy_data, tmp_path / "run", log_validation=True, **training)
    checked = check_recipe(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    runtime = build_runtime(checked, strategy)
    validator = runtime.family.build_validator(runtime.components["student"], checked.recipe, strategy, None)
    return runtime, validator


def test_finetune_validation_writes_mp4_and_tensorboard(tiny_wan, toy_data, tmp_path, dist_env):
    """ODE with CFG (the adapter's unconditional embedding) through a ZeRO-3 role, in this process."""
    from ds_distill.engines import Strategy
    from ds_distill.utils.tracking import Tracker

    prompts = write_prompts(tmp_path / "prompts.json", PROMPTS[:2])
    runtime, validator = build_finetune(tiny_wan, toy_data, tmp_path, Strategy(dist_env),
                                        validation_dataset_file=str(prompts), validation_sampling_steps=2,
                                        validation_guidance_scale=3.0)
    out = tmp_path / "run"
    validator.tracker = Tracker(out / "logs", enabled=True)
    for step in (0, 5):
        written = validator.run(runtime.method, step)
        assert written == check_step_folder(out / "validation" / f"step-{step}", 2)
        manifest = json.loads((out / "validation" / f"step-{step}" / "manifest.json").read_text())
        assert (manifest["sampler_kind"], manifest["sampling_steps"], manifest["guidance_scale"]) == ("ode", 2, 3.0)
        assert [v["seed"] for v in manifest["videos"]] == [42, 43]
    validator.tracker.close()
    # same weights, same fixed seed: the same videos
    for name in ("0-a-red-ball-bouncing-on-the-floor.mp4", "1-a-blue-cube-spinning-in-space.mp4"):
        assert np.array_equal(read_mp4(out / "validation" / "step-0" / name),
                              read_mp4(out / "validation" / "step-5" / name))
    assert runtime.bundle["student"].module.training  # validation leaves the role as it found it

    videos = tensorboard_videos(out / "logs")
    assert sorted(videos) == ["validation/0-a-red-ball-bouncing-on-the-floor",
                              "validation/1-a-blue-cube-spinning-in-space"]
    for events in videos.values():
        assert [e.step for e in events] == [0, 5]
        for e in events:
            # add_video silently writes nothing when moviepy is missing or 2.x: check the GIF is really there
            assert e.encoded_image_string[:6] == b"GIF89a" and len(e.encoded_image_string) > 2000
    cube = videos["validation/1-a-blue-cube-spinning-in-space"][0]
    assert (cube.width, cube.height) == (48, 32)


def test_bad_prompts_file_is_one_line(tiny_wan, toy_data, tmp_path, dist_env):
    from ds_distill.engines import Strategy
    from ds_distill.models.components import read_components
    from ds_distill.utils.config import recipe_from_mapping
    from ds_distill.validators.wan import WanValidator

    bad = write_prompts(tmp_path / "prompts.json", [{"caption": "ok"}, {"caption": "ok", "height": 100}])
    recipe = recipe_from_mapping(finetune_recipe(tiny_wan, toy_data, tmp_path / "run", log_validation=True,
                                                 validation_dataset_file=str(bad)), "recipe.yaml")
    with pytest.raises(DataError) as info:
        WanValidator(read_components(tiny_wan), recipe, Strategy(dist_env))
    assert str(info.value) == f"{bad}: data[1].height: 100 is not a multiple of 16"


def test_dmd2_validation_on_two_ranks_matches_the_sample_cli(tiny_wan, toy_data, tmp_path):
    """Two ZeRO-3 ranks, three prompts (one rank pads), SDE on the DMD steps with the EMA weights: the videos
    before training equal what `ds-distill sample` makes from the same weights with plain PyTorch."""
    from ds_distill.sample import main as sample_main

    out = tmp_path / "run"
    prompts = write_prompts(tmp_path / "prompts.json", PROMPTS)
    recipe = dmd2_recipe(tiny_wan, toy_data, out, method={"ema_decay": 0.9, "dmd_denoising_steps": [1000, 500]},
                         max_train_steps=1, train_batch_size=1, log_validation=True, validation_steps=1,
                         validation_dataset_file=str(prompts), height=64, width=64)
    proc = run_cli(deepspeed_cmd(2, write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (0, 1):
        manifest = json.loads((out / "validation" / f"step-{step}" / "manifest.json").read_text())
        assert (manifest["sampler_kind"], manifest["sampling_timesteps"], manifest["ema"]) == \
            ("sde", [1000, 500], True)
    videos = check_step_folder(out / "validation" / "step-0", 3)
    check_step_folder(out / "validation" / "step-1", 3)
    assert len(tensorboard_videos(out / "logs")) == 3

    cli_out = tmp_path / "cli"
    assert sample_main(["--model", str(tiny_wan), "--output-dir", str(cli_out), "--prompts-file", str(prompts),
                        "--sampler", "sde", "--timesteps", "1000", "500", "--seed", "42", "--text-len", "16",
                        "--height", "64", "--width", "64", "--num-frames", "5"]) == 0
    # the CLI's explicit size flags override the file; compare the prompts that ask for 64x64x5
    for i in (0, 2):
        ours = read_mp4(videos[i]).astype(np.int16)
        theirs = read_mp4(cli_out / videos[i].name).astype(np.int16)
        assert np.abs(ours - theirs).max() <= 2

    # Each rank decoded and wrote the prompts it sampled (strided: 0 and 2 on rank 0, 1 on rank 1), and the video
    # rank 1 decoded equals the one-process CLI's as well.
    for step in (0, 1):
        manifest = json.loads((out / "validation" / f"step-{step}" / "manifest.json").read_text())
        assert [(v["file"], v["rank"]) for v in manifest["videos"]] == [(p.name, r) for p, r in zip(videos, [0, 1, 0])]
    cli_small = tmp_path / "cli-small"
    assert sample_main(["--model", str(tiny_wan), "--output-dir", str(cli_small), "--prompts-file", str(prompts),
                        "--sampler", "sde", "--timesteps", "1000", "500", "--seed", "42", "--text-len", "16",
                        "--height", "32", "--width", "48", "--num-frames", "9"]) == 0
    ours = read_mp4(videos[1]).astype(np.int16)
    assert np.abs(ours - read_mp4(cli_small / videos[1].name).astype(np.int16)).max() <= 2
