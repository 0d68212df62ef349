"""Bad inputs to the commands other than `train`: each gives one `error:` line, exit code 2, no traceback, and
leaves every file it was pointed at (models, data, output folders) byte-identical; generators never overwrite.

Every case runs through the `ds-distill` dispatcher in-process (`ds_distill.cli.main`), as the console script
does. test_bad_inputs.py holds the training-side table; the README lists both.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

import deepspeed  # noqa: F401  (imported here so its one-time accelerator notice is not part of a case's stderr)
from ds_distill.cli import main as cli_main
from ds_distill.utils.dataset_schema import T2V_SCHEMA, tensor_to_bytes
from ds_distill.utils.toy_data import MODES_FILE

PROMPT = "a red ball bouncing on the floor"
SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--text-len", "16"]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file (content hash) and folder under the given folders."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def model_copy(tiny_wan: Path, tmp: Path, drop: str | None = None) -> Path:
    """A copy of the tiny Wan, optionally without one component folder."""
    dst = tmp / "model"
    shutil.copytree(tiny_wan, dst)
    if drop:
        shutil.rmtree(dst / drop)
    return dst


def videos_and_captions(tmp: Path, entries=(("a.mp4", PROMPT),)) -> tuple[Path, Path]:
    """A videos folder and captions JSON; the checks refuse before any video is decoded, so bytes suffice."""
    videos = tmp / "videos"
    videos.mkdir()
    for name, _ in entries:
        (videos / name).write_bytes(b"\x00\x00\x00\x18ftypmp42")
    captions = tmp / "captions.json"
    captions.write_text(json.dumps([{"path": n, "caption": c} for n, c in entries]))
    return videos, captions


def part_file(folder: Path, ids_captions: list[tuple[str, str]], **settings) -> Path:
    """An output folder as preprocess leaves it: a part file and `_preprocess.json` with the given settings."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "vae_latent_bytes": tensor_to_bytes(torch.zeros(4, 3, 2, 2)), "vae_latent_shape": [4, 3, 2, 2],
             "vae_latent_dtype": "float32", "text_embedding_bytes": tensor_to_bytes(torch.zeros(2, 32)),
             "text_embedding_shape": [2, 32], "text_embedding_dtype": "float32", "file_name": i, "caption": c,
             "media_type": "video", "width": 32, "height": 32, "num_frames": 9, "duration_sec": 0.5, "fps": 16.0}
            for i, c in ids_captions]
    pq.write_table(pa.Table.from_pylist(rows, schema=T2V_SCHEMA), folder / "part-00000.parquet")
    base = {"height": 32, "width": 32, "num_frames": 9, "fps": 16.0, "text_len": 16, "latent_dtype": "float32",
            "text_dtype": "float32"}
    (folder / "_preprocess.json").write_text(json.dumps({"settings": {**base, **settings}, "rows": len(rows),
                                                         "files": {"part-00000.parquet": len(rows)}}))
    return folder


def preprocess_argv(model: Path, videos: Path, captions: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "--model", str(model), "--videos", str(videos), "--captions", str(captions),
            "--output", str(out), "--height", "32", "--width", "32", "--num-frames", "9", "--fps", "16",
            "--text-len", "16", *extra]


def sample_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model), "--output-dir", str(out), "--device", "cpu", *extra]


def eval_argv(data: Path, teacher: Path, *extra: str) -> list[str]:
    return ["eval-toy", "--data", str(data), "--teacher", str(teacher), "--per-caption", "1", *extra]


# Each case: (tmp, tiny_wan, toy_data) -> (argv for `ds-distill`, fragments the one line must contain).
# --- make-tiny-wan --------------------------------------------------------------------------------------------
def case_tiny_existing_model(tmp, wan, toy):
    model = model_copy(wan, tmp)
    return ["make-tiny-wan", str(model)], [str(model), "not empty", "--overwrite"]


def case_tiny_out_is_a_file(tmp, wan, toy):
    (tmp / "afile").write_text("x")
    return ["make-tiny-wan", str(tmp / "afile")], ["afile", "exists and is not a folder"]


def case_tiny_parent_is_a_file(tmp, wan, toy):
    (tmp / "afile").write_text("x")
    return ["make-tiny-wan", str(tmp / "afile" / "model")], ["afile is a file, not a folder"]


def case_tiny_zero_layers(tmp, wan, toy):
    return ["make-tiny-wan", str(tmp / "new"), "--layers", "0"], ["--layers 0", "at least 1"]


def case_tiny_odd_head_dim(tmp, wan, toy):
    return ["make-tiny-wan", str(tmp / "new"), "--head-dim", "7"], ["--head-dim 7", "must be even"]


def case_tiny_unknown_option(tmp, wan, toy):
    return ["make-tiny-wan", str(tmp / "new"), "--depth", "2"], ["unrecognized arguments: --depth 2", "--help"]


def case_tiny_overwrite_not_a_model(tmp, wan, toy):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("keep me")
    return ["make-tiny-wan", str(tmp / "notes"), "--overwrite"], ["notes", "replaces only a model folder"]


# --- make-toy-data --------------------------------------------------------------------------------------------
def case_toy_existing_dataset(tmp, wan, toy):
    shutil.copytree(toy, tmp / "toy")
    return ["make-toy-data", str(tmp / "toy"), "--model", str(wan)], [str(tmp / "toy"), "--overwrite"]


def case_toy_overwrite_not_a_dataset(tmp, wan, toy):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("keep me")
    return ["make-toy-data", str(tmp / "notes"), "--model", str(wan), "--overwrite"], \
        ["notes", "replaces only a toy dataset"]


def case_toy_model_missing(tmp, wan, toy):
    return ["make-toy-data", str(tmp / "toy"), "--model", str(tmp / "nope")], ["--model", "nope", "does not exist"]


def case_toy_model_without_text_encoder(tmp, wan, toy):
    model = model_copy(wan, tmp, drop="text_encoder")
    return ["make-toy-data", str(tmp / "toy"), "--model", str(model)], ["--model", "has no text_encoder/"]


def case_toy_vae_config_not_json(tmp, wan, toy):
    model = model_copy(wan, tmp)
    (model / "vae" / "config.json").write_text('{"z_dim": 4,')
    return ["make-toy-data", str(tmp / "toy"), "--model", str(model)], ["vae/config.json is not valid JSON"]


def case_toy_zero_rows(tmp, wan, toy):
    return ["make-toy-data", str(tmp / "toy"), "--model", str(wan), "--rows-per-caption", "0"], \
        ["--rows-per-caption 0", "at least 1"]


def case_toy_model_option_missing(tmp, wan, toy):
    return ["make-toy-data", str(tmp / "toy")], ["required", "--model"]


# --- preprocess -----------------------------------------------------------------------------------------------
def case_preprocess_other_jobs_output(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    out = part_file(tmp / "out", [("other.mp4", "another caption")], model=str(wan.resolve()))
    return preprocess_argv(wan, videos, captions, out), ["'other.mp4'", "another job's output", "--overwrite"]


def case_preprocess_dataset_from_elsewhere(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    shutil.copytree(toy / "latents", tmp / "out")  # part-0000N.parquet files, but no manifest and other ids
    return preprocess_argv(wan, videos, captions, tmp / "out"), ["toy-00000", "another job's output"]


def case_preprocess_foreign_files(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "README.txt").write_text("my data")
    return preprocess_argv(wan, videos, captions, tmp / "out"), ["README.txt", "did not write", "--overwrite"]


def case_preprocess_other_settings(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    out = part_file(tmp / "out", [("a.mp4", PROMPT)], num_frames=13)
    return preprocess_argv(wan, videos, captions, out), ["--num-frames 13, not 9", "--overwrite"]


def case_preprocess_caption_changed(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    out = part_file(tmp / "out", [("a.mp4", "an old caption")])
    return preprocess_argv(wan, videos, captions, out), ["'a.mp4'", "another caption"]


def case_preprocess_height_not_multiple(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    return preprocess_argv(wan, videos, captions, tmp / "out", "--height", "72"), \
        ["--height 72", "multiple of 16"]


def case_preprocess_fps_nan(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    return preprocess_argv(wan, videos, captions, tmp / "out", "--fps", "nan"), ["--fps nan", "positive number"]


def case_preprocess_output_is_a_file(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    (tmp / "out").write_text("x")
    return preprocess_argv(wan, videos, captions, tmp / "out"), ["--output", "exists and is not a folder"]


def case_preprocess_captions_are_yaml(tmp, wan, toy):
    videos, _ = videos_and_captions(tmp)
    (tmp / "captions.yaml").write_text("- path: a.mp4\n  caption: a red ball\n")
    return preprocess_argv(wan, videos, tmp / "captions.yaml", tmp / "out"), ["captions.yaml", "not valid JSON"]


def case_preprocess_model_without_tokenizer(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    model = model_copy(wan, tmp, drop="tokenizer")
    return preprocess_argv(model, videos, captions, tmp / "out"), ["--model", "has no tokenizer/"]


def case_preprocess_vae_weights_of_another_config(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    model = model_copy(wan, tmp)
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "base_dim": 2 * config["base_dim"]}))
    return preprocess_argv(model, videos, captions, tmp / "out"), ["--model", "cannot load the VAE or text encoder"]


def case_preprocess_zero_rows_per_file(tmp, wan, toy):
    videos, captions = videos_and_captions(tmp)
    return preprocess_argv(wan, videos, captions, tmp / "out", "--rows-per-file", "0"), ["--rows-per-file 0"]


# --- sample ---------------------------------------------------------------------------------------------------
def case_sample_existing_videos(tmp, wan, toy):
    out = tmp / "out"
    out.mkdir()
    (out / "0-a-red-ball-bouncing-on-the-floor.mp4").write_bytes(b"an earlier video")
    (out / "manifest.json").write_text("{}")
    return sample_argv(wan, out, "--prompt", PROMPT, *SMALL), \
        ["0-a-red-ball-bouncing-on-the-floor.mp4", "--overwrite"]


def case_sample_guidance_nan(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--guidance", "nan", *SMALL), ["--guidance", "finite"]


def case_sample_guidance_negative(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--guidance", "-2", *SMALL), ["--guidance", "-2.0"]


def case_sample_flow_shift_zero(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--flow-shift", "0", *SMALL), \
        ["--flow-shift", "positive"]


def case_sample_frames_not_4k_plus_1(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--num-frames", "6", "--height", "32",
                       "--width", "32"), ["num_frames: 6 is not 4*k+1"]


def case_sample_beyond_rotary_range(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--height", "1024", "--width", "32",
                       "--num-frames", "5"), ["height: 1024", "rotary range", "rope_max_seq_len 32"]


def case_sample_output_is_a_file(tmp, wan, toy):
    (tmp / "out").write_text("x")
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, *SMALL), ["--output-dir", "exists and is not a folder"]


def case_sample_prompts_not_json(tmp, wan, toy):
    (tmp / "prompts.json").write_text('{"data": [{"caption": "x"},]}')
    return sample_argv(wan, tmp / "out", "--prompts-file", str(tmp / "prompts.json")), \
        ["prompts.json", "not valid JSON"]


def case_sample_no_transformer_weights(tmp, wan, toy):
    model = model_copy(wan, tmp)
    for f in (model / "transformer").glob("*.safetensors"):
        f.unlink()
    return sample_argv(model, tmp / "out", "--prompt", PROMPT, *SMALL), ["transformer holds no .safetensors weights"]


def case_sample_truncated_vae_weights(tmp, wan, toy):
    model = model_copy(wan, tmp)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy that stopped early
    return sample_argv(model, tmp / "out", "--prompt", PROMPT, *SMALL), \
        ["vae/diffusion_pytorch_model.safetensors", "not a readable safetensors file"]


def case_toy_index_names_missing_shard(tmp, wan, toy):
    model = model_copy(wan, tmp)
    (model / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))
    return ["make-toy-data", str(tmp / "toy"), "--model", str(model)], \
        ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "missing"]


def case_sample_timesteps_nan(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--sampler", "sde", "--timesteps", "nan", *SMALL), \
        ["--timesteps", "(0, 1000]"]


def case_sample_unknown_option(tmp, wan, toy):
    return sample_argv(wan, tmp / "out", "--prompt", PROMPT, "--cfg", "3"), ["unrecognized arguments: --cfg 3"]


def case_sample_vae_config_not_json(tmp, wan, toy):
    model = model_copy(wan, tmp)
    (model / "vae" / "config.json").write_text("[1, 2")
    return sample_argv(model, tmp / "out", "--prompt", PROMPT, *SMALL), ["vae/config.json is not valid JSON"]


# --- eval-toy -------------------------------------------------------------------------------------------------
def case_eval_data_not_toy(tmp, wan, toy):
    return eval_argv(wan, wan), ["--data", "no latents/"]


def case_eval_bad_timesteps(tmp, wan, toy):
    return eval_argv(toy, wan, "--timesteps", "1000,abc"), ["--timesteps '1000,abc'", "comma-separated"]


def case_eval_json_exists(tmp, wan, toy):
    (tmp / "rows.json").write_text("[]")
    return eval_argv(toy, wan, "--json", str(tmp / "rows.json")), ["rows.json", "file exists", "--overwrite"]


def case_eval_teacher_missing(tmp, wan, toy):
    return eval_argv(toy, tmp / "nope"), ["--teacher", "nope", "does not exist"]


def case_eval_damaged_modes_file(tmp, wan, toy):
    shutil.copytree(toy, tmp / "toy")
    (tmp / "toy" / "toy_modes.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    return eval_argv(tmp / "toy", wan), ["toy_modes.safetensors", "not a readable toy-mode file"]


def case_eval_zero_per_caption(tmp, wan, toy):
    return eval_argv(toy, wan, "--per-caption", "0"), ["--per-caption 0", "at least 1"]


# --- launch, demo, the dispatcher -----------------------------------------------------------------------------
def case_launch_hostfile_is_a_folder(tmp, wan, toy):
    (tmp / "hosts").mkdir()
    return ["launch", "--hostfile", str(tmp / "hosts"), "--", "--config", "r.yaml"], ["hosts", "is a folder"]


def case_launch_hostfile_binary(tmp, wan, toy):
    (tmp / "hosts").write_bytes(b"\xff\xfe\x00node-a")
    return ["launch", "--hostfile", str(tmp / "hosts"), "--", "--config", "r.yaml"], ["hosts", "not a text file"]


def case_launch_recipe_bad_yaml(tmp, wan, toy):
    (tmp / "hosts").write_text("localhost slots=2\n")
    (tmp / "r.yaml").write_text("training: [unclosed\n")
    return ["launch", "--hostfile", str(tmp / "hosts"), "--", "--config", str(tmp / "r.yaml")], ["r.yaml"]


def case_demo_output_is_a_file(tmp, wan, toy):
    (tmp / "out").write_text("x")
    return ["demo", "--output-dir", str(tmp / "out")], ["--output-dir", "exists and is not a folder"]


def case_demo_zero_ranks(tmp, wan, toy):
    return ["demo", "--output-dir", str(tmp / "out"), "--nproc", "0"], ["--nproc 0", "at least 1"]


def case_demo_steps_not_a_number(tmp, wan, toy):
    return ["demo", "--output-dir", str(tmp / "out"), "--dmd-steps", "ten"], ["--dmd-steps", "invalid int value"]


def case_report_unknown_option(tmp, wan, toy):
    return ["report", "--bogus"], ["ds-distill report", "unrecognized arguments: --bogus"]


def case_cli_option_instead_of_command(tmp, wan, toy):
    return ["--version"], ["unknown command '--version'"]


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tiny_wan, toy_data, tmp_path, capsys):
    argv, fragments = CASES[name](tmp_path, tiny_wan, toy_data)
    argv = [str(a) for a in argv]
    before = snapshot(tmp_path, tiny_wan, toy_data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli_main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert snapshot(tmp_path, tiny_wan, toy_data) == before  # nothing written, created or removed


def test_table_is_big_enough():
    assert len(CASES) >= 40


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_tiny_wan_overwrite_swaps_in_exactly_the_new_model(tmp_path, capsys):
    model, fresh = tmp_path / "model", tmp_path / "fresh"
    model.mkdir()  # an existing empty folder is no obstacle, and stays the same folder (a shell may be in it)
    inode = model.stat().st_ino
    assert cli_main(["make-tiny-wan", str(model), "--layers", "1"]) == 0
    assert model.stat().st_ino == inode and (model / "model_index.json").is_file()
    # What a sharded save of another model leaves behind; none of it may survive --overwrite.
    (model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {}}')
    (model / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"old shard")
    old = files_of(model)
    assert cli_main(["make-tiny-wan", str(model), "--layers", "2", "--seed", "1", "--overwrite"]) == 0
    assert cli_main(["make-tiny-wan", str(fresh), "--layers", "2", "--seed", "1"]) == 0
    new, ref = files_of(model), files_of(fresh)
    assert sorted(new) == sorted(ref)  # exactly the files of a fresh make with the same arguments
    # ... with the same bytes, except the tokenizer, whose trainer does not write its vocabulary in a fixed order.
    assert {k: v for k, v in new.items() if k != "tokenizer/tokenizer.json"} == \
        {k: v for k, v in ref.items() if k != "tokenizer/tokenizer.json"}
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert new[weights] != old[weights]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "model"]  # no .new-/.old- folder left


def test_make_toy_data_overwrite_swaps_in_exactly_the_new_dataset(tiny_wan, tmp_path):
    toy, fresh = tmp_path / "toy", tmp_path / "fresh"
    assert cli_main(["make-toy-data", str(toy), "--model", str(tiny_wan), "--rows-per-caption", "3"]) == 0
    (toy / "latents" / "part-00007.parquet").write_bytes(b"a part file of an older, bigger dataset")
    old = files_of(toy)
    args = ["--model", str(tiny_wan), "--rows-per-caption", "2", "--seed", "5"]
    assert cli_main(["make-toy-data", str(toy), *args, "--overwrite"]) == 0
    assert cli_main(["make-toy-data", str(fresh), *args]) == 0
    new, ref = files_of(toy), files_of(fresh)
    assert sorted(new) == sorted(ref)
    # Same bytes, except the safetensors header's metadata, which is written in no fixed order: compare content.
    assert {k: v for k, v in new.items() if k != MODES_FILE} == {k: v for k, v in ref.items() if k != MODES_FILE}
    with safe_open(str(toy / MODES_FILE), "pt") as a, safe_open(str(fresh / MODES_FILE), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert new["latents/part-00000.parquet"] != old["latents/part-00000.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "toy"]


def test_failed_generation_leaves_the_old_folder(tiny_wan, tmp_path, monkeypatch):
    """A generator that fails mid-write (here: the text encoder) leaves the existing dataset as it was."""
    from ds_distill.models import wan_common

    toy = tmp_path / "toy"
    assert cli_main(["make-toy-data", str(toy), "--model", str(tiny_wan), "--rows-per-caption", "1"]) == 0
    before = files_of(toy)

    def broken(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(wan_common, "encode_prompts", broken)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        cli_main(["make-toy-data", str(toy), "--model", str(tiny_wan), "--overwrite"])
    assert files_of(toy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_eval_toy_json_is_kept_unless_overwrite(tiny_wan, toy_data, tmp_path, capsys):
    rows = tmp_path / "rows.json"
    argv = eval_argv(toy_data, tiny_wan, "--timesteps", "1000,500", "--json", str(rows))
    assert cli_main(argv) == 0
    first = json.loads(rows.read_text())
    assert [r["label"] for r in first] == ["data", "teacher@50 ode", "teacher@2 sde"]
    assert "teacher@2 sde" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads(rows.read_text()) == first
    assert cli_main([*argv, "--overwrite", "--guidance", "2"]) == 0
    second = json.loads(rows.read_text())
    assert second[0] == first[0] and second[1] != first[1]  # the data row is the same; guided teacher is not
