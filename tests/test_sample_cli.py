"""`ds-distill sample` (ds_distill.sample): mp4 files from a Diffusers Wan directory, plain PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PYTHON, run_cli
from ds_distill.sample import main as sample_main

PROMPT = "a red ball bouncing on the floor"
NEGATIVE = "worst quality, low quality"
SMALL = ["--height", "64", "--width", "64", "--num-frames", "5", "--text-len", "16"]




def read_mp4(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_ode_sample_matches_wan_pipeline(tiny_wan, tmp_path):
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert sample_main(["--model", str(tiny_wan), "--output-dir", str(out), "--prompt", PROMPT, "--steps", "3",
                        "--guidance", "3", "--seed", "7", "--negative-prompt", NEGATIVE, "--save-latents",
                        "--device", "cpu", *SMALL]) == 0
    name = "0-a-red-ball-bouncing-on-the-floor"
    video = read_mp4(out / f"{name}.mp4")
    assert video.shape == (5, 64, 64, 3) and video.std() > 1.0

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=5, num_inference_steps=3,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(7), output_type="latent",
               max_sequence_length=16).frames
    torch.testing.assert_close(load_file(str(out / f"{name}.safetensors"))["latents"], ref, atol=1e-5, rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["sampler_kind"], manifest["guidance_scale"], manifest["flow_shift"]) == ("ode", 3.0, 3.0)


def test_sde_sample_from_a_prompts_file(tiny_wan, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"data": [
        {"caption": "a blue cube spinning in space", "height": 32, "width": 48, "num_frames": 9},
        {"caption": PROMPT, "height": 64, "width": 64, "num_frames": 5},
    ]}))
    out = tmp_path / "out"
    assert sample_main(["--model", str(tiny_wan), "--output-dir", str(out), "--prompts-file", str(prompts),
                        "--sampler", "sde", "--timesteps", "1000", "500", "--text-len", "16", "--seed", "3"]) == 0
    assert read_mp4(out / "0-a-blue-cube-spinning-in-space.mp4").shape == (9, 32, 48, 3)
    assert read_mp4(out / "1-a-red-ball-bouncing-on-the-floor.mp4").shape == (5, 64, 64, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler_kind"] == "sde" and manifest["guidance_scale"] == 1.0
    assert [v["seed"] for v in manifest["videos"]] == [3, 4]
    assert manifest["videos"][0]["sampling_timesteps"] == [1000.0, 500.0]
    assert "2 videos" in capsys.readouterr().out


def test_runs_as_a_module():
    proc = run_cli([PYTHON, "-m", "ds_distill.sample", "--help"])
    assert proc.returncode == 0 and "--prompts-file" in proc.stdout and "--timesteps" in proc.stdout


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--prompt", PROMPT, "--sampler", "sde", "--timesteps", "500", "1000"],
         "--timesteps: SDE timesteps must be strictly descending"),
        (["--prompt", PROMPT, "--steps", "0"], "--steps: must be at least 1"),
        (["--prompt", PROMPT, "--height", "72"], "--prompt: prompt 0.height: 72 is not a multiple of 16"),
        (["--prompts-file", "PROMPTS", "--steps", "2"], "data: the list of prompts is empty"),
    ],
)
def test_user_errors_are_one_line(tiny_wan, tmp_path, capsys, extra, expected):
    empty = tmp_path / "empty.json"
    empty.write_text('{"data": []}')
    extra = [str(empty) if a == "PROMPTS" else a for a in extra]
    with pytest.raises(SystemExit) as info:
        sample_main(["--model", str(tiny_wan), "--output-dir", str(tmp_path / "out"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_missing_model_and_missing_components(tiny_wan, tmp_path, capsys):
    import shutil

    with pytest.raises(SystemExit):
        sample_main(["--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"), "--prompt", "x"])
    assert "does not exist" in capsys.readouterr().err
    bare = tmp_path / "student"  # an export with only the transformer
    shutil.copytree(tiny_wan / "transformer", bare / "transformer")
    with pytest.raises(SystemExit):
        sample_main(["--model", str(bare), "--output-dir", str(tmp_path / "o"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert "has no vae/" in err and "--components-from" in err
    assert sample_main(["--model", str(bare), "--components-from", str(tiny_wan), "--output-dir",
                        str(tmp_path / "o"), "--prompt", PROMPT, "--sampler", "sde", "--timesteps", "1000",
                        *SMALL]) == 0
    assert read_mp4(tmp_path / "o" / "0-a-red-ball-bouncing-on-the-floor.mp4").shape == (5, 64, 64, 3)


def test_earlier_videos_are_kept_unless_overwrite(tiny_wan, tmp_path, capsys):
    """A second run into the same --output-dir is refused; with --overwrite it replaces the videos and removes
    the ones the old manifest lists that it does not write again."""
    out = tmp_path / "out"
    fast = ["--model", str(tiny_wan), "--output-dir", str(out), "--sampler", "sde", "--timesteps", "1000",
            "--height", "32", "--width", "32", "--num-frames", "5", "--text-len", "16"]
    second = "a blue cube spinning in space"
    assert sample_main([*fast, "--prompt", PROMPT, "--prompt", second]) == 0
    first = out / "0-a-red-ball-bouncing-on-the-floor.mp4"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["0-a-red-ball-bouncing-on-the-floor.mp4", "1-a-blue-cube-spinning-in-space.mp4",
                              "manifest.json"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        sample_main([*fast, "--prompt", PROMPT, "--seed", "5"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and first.name in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert sample_main([*fast, "--prompt", PROMPT, "--seed", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [first.name, "manifest.json"]
    assert first.read_bytes() != before[first.name]  # another seed: a new video
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["file"] for v in manifest["videos"]] == [first.name] and manifest["videos"][0]["seed"] == 5
