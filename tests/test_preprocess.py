"""tools/preprocess.py: real mp4 files in, parquet the training loader reads out; resumable after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import PYTHON, REPO, run_cli
from ds_distill.preprocess import SLEEP_ENV, main, sample_indices

TOOL = str(REPO / "tools" / "preprocess.py")
TEXT_LEN = 16

# (relative path, frames, fps, height, width, caption key style); all 64x64 ones are checked against the VAE.
VIDEOS = [
    ("a.mp4", 13, 16, 64, 64, "ours"),
    ("sub/b.mp4", 9, 16, 64, 64, "fastvideo"),
    ("c.mp4", 17, 16, 64, 64, "ours"),
    ("fast.mp4", 26, 32, 64, 64, "fastvideo"),  # 32 fps sampled at 16: every other frame
    ("wide.mp4", 11, 16, 80, 112, "ours"),  # resized to cover 64x64, then center-cropped
    ("short.mp4", 5, 16, 64, 64, "ours"),  # fewer than 9 frames: skipped with a warning
]
ENCODED = [v[0] for v in VIDEOS if v[0] != "short.mp4"]


def caption_of(name: str) -> str:
    return f"a red ball bouncing on the floor in {name}"


def moving_square(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a colored square moving over a flat background."""
    rng = np.random.default_rng(seed)
    frames = np.empty((num, height, width, 3), np.uint8)
    frames[:] = rng.integers(20, 120, 3, dtype=np.uint8)
    color = rng.integers(150, 255, 3, dtype=np.uint8)
    for t in range(num):
        y, x = (4 + 2 * t) % (height - 16), (3 + 3 * t) % (width - 16)
        frames[t, y : y + 16, x : x + 16] = color
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=9, macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def decode_mp4(path: Path) -> np.ndarray:
    """All frames through imageio's ffmpeg reader (a different decoder path from the tool's PyAV)."""
    import imageio

    with imageio.get_reader(path, "ffmpeg") as reader:
        return np.stack([frame for frame in reader])  # list(reader) trips on its len() of inf


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of small mp4 files and a captions JSON mixing our format and FastVideo's."""
    root = tmp_path_factory.mktemp("videos")
    entries = []
    for i, (name, n, fps, h, w, style) in enumerate(VIDEOS):
        write_mp4(root / name, moving_square(n, h, w, seed=i), fps)
        if style == "ours":
            entries.append({"path": name, "caption": caption_of(name)})
        else:
            entries.append({"path": name, "cap": [caption_of(name), "an alternative caption"], "fps": fps})
    captions = root / "captions.json"
    captions.write_text(json.dumps(entries))
    return root, captions


def tool_args(model: Path, videos: Path, captions: Path, out: Path, **over) -> list[str]:
    opts = {"height": 64, "width": 64, "num-frames": 9, "fps": 16, "batch-size": 2, "rows-per-file": 2,
            "text-len": TEXT_LEN, **over}
    args = ["--model", str(model), "--videos", str(videos), "--captions", str(captions), "--output", str(out)]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def part_ids(out: Path) -> list[str]:
    return [i for f in sorted(out.glob("part-*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def test_sample_indices():
    assert sample_indices(5, Fraction(16), 16.0) == [0, 1, 2, 3, 4]
    assert sample_indices(5, Fraction(32), 16.0) == [0, 2, 4, 6, 8]
    assert sample_indices(5, Fraction(30), 16.0) == [0, 2, 4, 6, 8]  # nearest frame to i/16 s
    assert sample_indices(5, Fraction(8), 16.0) == [0, 1, 1, 2, 2]


def test_preprocess_matches_vae_and_text_encoder(tiny_wan, videos, tmp_path, capsys):
    from diffusers import AutoencoderKLWan

    from ds_distill.models.wan_common import PromptEncoder
    from ds_distill.utils.dataloader import ParquetDataset

    root, captions = videos
    out = tmp_path / "out"
    assert main(tool_args(tiny_wan, root, captions, out)) == 0
    cap = capsys.readouterr()
    assert "warning:" in cap.err and "short.mp4" in cap.err
    assert f"wrote {len(ENCODED)} rows in 3 files" in cap.out and "1 skipped" in cap.out
    assert sorted(part_ids(out)) == sorted(ENCODED)
    assert not list(out.glob(".*.tmp"))

    table = pq.read_table(out)  # the whole folder as one dataset: manifest and lock are hidden from it
    assert set(table["media_type"].to_pylist()) == {"video"}
    assert set(table["num_frames"].to_pylist()) == {9} and set(table["width"].to_pylist()) == {64}
    assert table["file_name"].to_pylist() == table["id"].to_pylist()

    ds = ParquetDataset(out, TEXT_LEN, need_latents=True)
    assert len(ds) == len(ENCODED)
    vae = AutoencoderKLWan.from_pretrained(tiny_wan / "vae").eval()
    prompts = PromptEncoder(tiny_wan)
    by_caption = {caption_of(v[0]): v for v in VIDEOS}
    for i in range(len(ds)):
        item = ds[i]
        name, _, fps, h, w, _ = by_caption[item["caption"]]
        assert item["vae_latent"].shape == (4, 3, 8, 8)
        assert item["text_embedding"].shape == (TEXT_LEN, 32)

        text = prompts([item["caption"]], TEXT_LEN)[0]
        assert int(item["text_mask"].sum()) == text.shape[0]
        torch.testing.assert_close(item["text_embedding"][: text.shape[0]], text)
        assert item["text_embedding"][text.shape[0] :].abs().sum() == 0

        if (h, w) != (64, 64):
            continue  # resizing is the tool's own; its shape is checked above
        frames = decode_mp4(root / name)[[i * fps // 16 for i in range(9)]]
        x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            expected = vae.encode(x[None]).latent_dist.mode()[0]
        torch.testing.assert_close(item["vae_latent"], expected, atol=1e-4, rtol=1e-4)

    # Rerun on a finished folder: nothing new, nothing duplicated.
    assert main(tool_args(tiny_wan, root, captions, out)) == 0
    cap = capsys.readouterr()
    assert "wrote 0 rows" in cap.out and f"{len(ENCODED)} videos already done" in cap.out
    assert sorted(part_ids(out)) == sorted(ENCODED)

    # Resuming with different settings would mix clip shapes: refused.
    with pytest.raises(SystemExit) as exc:
        main(tool_args(tiny_wan, root, captions, out, **{"num-frames": 13}))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-frames 9" in err[0]


def test_killed_halfway_then_rerun_has_each_video_once(tiny_wan, videos, tmp_path, monkeypatch):
    from ds_distill.utils.dataloader import ParquetDataset

    root, captions = videos
    out = tmp_path / "out"
    args = tool_args(tiny_wan, root, captions, out, **{"batch-size": 1, "rows-per-file": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", SLEEP_ENV: "300"}
    proc = subprocess.Popen([PYTHON, TOOL, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = out / "part-00000.parquet"
    deadline = time.time() + 240
    try:
        while not first.exists():
            assert proc.poll() is None, f"preprocess exited early: {proc.communicate()[1][-2000:]}"
            assert time.time() < deadline, "no part file appeared"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert part_ids(out) == [ENCODED[0]]
    # What a kill during a write leaves: an incomplete temporary file, never a .parquet.
    (out / ".part-00001.parquet.tmp").write_bytes(b"PAR1 half a file")

    monkeypatch.delenv(SLEEP_ENV, raising=False)
    assert main(args) == 0
    ids = part_ids(out)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(ENCODED)
    assert not list(out.glob(".*.tmp"))
    assert len(ParquetDataset(out, TEXT_LEN, need_latents=True)) == len(ENCODED)
    manifest = json.loads((out / "_preprocess.json").read_text())
    assert manifest["rows"] == len(ENCODED) and manifest["settings"]["num_frames"] == 9


def _one_error_line(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tiny_wan, videos, tmp_path):
    root, _ = videos
    out = tmp_path / "out"

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"path": "a.mp4", "caption": "x"},')
    _one_error_line(run_cli([PYTHON, TOOL, *tool_args(tiny_wan, root, bad_json, out)]), "bad.json", "not valid JSON")

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"path": "a.mp4", "caption": "x"}, {"path": "nope.mp4", "caption": "y"}]))
    _one_error_line(run_cli([PYTHON, TOOL, *tool_args(tiny_wan, root, missing, out)]), "entry 1", "nope.mp4")

    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"path": "a.mp4", "caption": "x"}]))
    _one_error_line(run_cli([PYTHON, TOOL, *tool_args(tiny_wan, root, good, out, **{"num-frames": 10})]),
                    "--num-frames 10", "4k+1")
    assert not out.exists()


def test_unreadable_video_keeps_finished_rows(tiny_wan, videos, tmp_path, capsys):
    root, _ = videos
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"path": str(root / "a.mp4"), "caption": "x"},
                                    {"path": "broken.mp4", "caption": "y"}]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(tool_args(tiny_wan, tmp_path, captions, out, **{"batch-size": 1, "rows-per-file": 4}))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.mp4" in err[0] and "unreadable video" in err[0]
    assert part_ids(out) == [str(root / "a.mp4")] and not list(out.glob(".*.tmp"))


def test_another_jobs_output_is_refused_then_moved_aside_with_overwrite(tiny_wan, videos, tmp_path, capsys):
    """Only this job's own output is continued; --overwrite moves another job's folder aside, never deletes it."""
    import hashlib

    def snapshot(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    root, captions = videos
    out = tmp_path / "out"
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"path": "a.mp4", "caption": "the same video, captioned otherwise"}]))
    assert main(tool_args(tiny_wan, root, other, out)) == 0
    before = snapshot(out)
    assert main(tool_args(tiny_wan, root, other, out)) == 0  # the same job again: finished, nothing written
    assert snapshot(out) == before
    capsys.readouterr()

    with pytest.raises(SystemExit) as exc:
        main(tool_args(tiny_wan, root, captions, out))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'a.mp4'" in err[0] and "--overwrite" in err[0], err
    assert snapshot(out) == before

    assert main([*tool_args(tiny_wan, root, captions, out), "--overwrite"]) == 0
    aside = list(tmp_path.glob("out.replaced-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert f"moved the old {out} aside to {aside[0]}" in capsys.readouterr().err
    assert sorted(part_ids(out)) == sorted(ENCODED)
