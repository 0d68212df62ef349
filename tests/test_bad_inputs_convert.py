"""Mistakes a user makes with the converter (tools/convert_zero_to_safetensors.py, run as a user runs it):
each is one line on stderr, exit 2, no traceback, and no file written or changed (every file hashed)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, finetune_recipe, run_cli, train_in_process, write_recipe

TOOL = str(REPO / "tools" / "convert_zero_to_safetensors.py")


@pytest.fixture(scope="module")
def world(tiny_wan, toy_data, dist_env, tmp_path_factory) -> dict[str, Path]:
    """A real 1-step finetune checkpoint, an earlier export of it, a user's folder and a file, side by side."""
    root = tmp_path_factory.mktemp("convert_bad")
    run = train_in_process(write_recipe(root / "ft.yaml", finetune_recipe(
        tiny_wan, toy_data, root / "run", max_train_steps=1, checkpointing_steps=1, trackers=[])), dist_env)
    res = run_cli([PYTHON, TOOL, str(run), str(root / "outs" / "export")])
    assert res.returncode == 0, res.stderr[-3000:]
    mine = root / "outs" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (root / "outs" / "file.bin").write_bytes(b"\0" * 10)
    wrong = root / "wrong_base"
    (wrong / "transformer").mkdir(parents=True)
    shutil.copy(tiny_wan / "model_index.json", wrong / "model_index.json")
    cfg = json.loads((tiny_wan / "transformer" / "config.json").read_text())
    (wrong / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": cfg["num_layers"] + 1}))
    empty = root / "interrupted_run"
    (empty / "checkpoint-3").mkdir(parents=True)
    # The run copied with its recipe.yaml edited by hand: an unknown family, and text that is not YAML.
    bad_family, bad_yaml = root / "run_bad_family", root / "run_bad_yaml"
    for copy in (bad_family, bad_yaml):
        shutil.copytree(run, copy, symlinks=True)
    recipe = (run / "recipe.yaml").read_text()
    assert "family: wan" in recipe
    (bad_family / "recipe.yaml").write_text(recipe.replace("family: wan", "family: wan3"))
    (bad_yaml / "recipe.yaml").write_text("roles: [unclosed\n")
    return {"root": root, "run": run, "ckpt": run / "checkpoint-1", "export": root / "outs" / "export",
            "mine": mine, "file": root / "outs" / "file.bin", "new": root / "outs" / "new", "tiny_wan": tiny_wan,
            "wrong_base": wrong, "interrupted": empty, "bad_family": bad_family, "bad_yaml": bad_yaml}


# name: (argv with {placeholders} from `world`, a phrase the one line must hold)
CASES = {
    "existing export, no --overwrite": (["{run}", "{export}"], "not empty; pass --overwrite"),
    "user's folder with --overwrite": (["{run}", "{mine}", "--overwrite"], "replaces only an export"),
    "OUT is a file": (["{run}", "{file}", "--overwrite"], "exists and is not a folder"),
    "--overwrite, missing checkpoint": (["{root}/nope", "{export}", "--overwrite"], "does not exist"),
    "model folder as checkpoint": (["{tiny_wan}", "{new}"], "not a ds_distill checkpoint"),
    "no complete checkpoint": (["{interrupted}", "{new}"], "holds no complete checkpoint"),
    "frozen or absent role": (["{run}", "{new}", "--role", "critic"], "no trainable role 'critic'"),
    "role folder vs --role": (["{ckpt}/student", "{new}", "--role", "critic"], "--role critic was asked for"),
    "--ema without EMA": (["{run}", "{export}", "--ema", "--overwrite"], "has no EMA weights"),
    "--max-shard-size word": (["{run}", "{new}", "--max-shard-size", "five"], "is not a size"),
    "--max-shard-size zero": (["{run}", "{new}", "--max-shard-size", "0MB"], "must be positive"),
    "--dtype unknown": (["{run}", "{new}", "--dtype", "int8"], "invalid choice: 'int8'"),
    "--base not a pipeline": (["{run}", "{new}", "--base", "{wrong_base}/transformer"], "not a Diffusers pipeline"),
    "--base of another shape": (["{run}", "{export}", "--base", "{wrong_base}", "--overwrite"],
                                "does not fit the transformer config"),
    "--link-base alone": (["{run}", "{new}", "--link-base"], "--link-base needs --base"),
    "OUT inside the checkpoint": (["{run}", "{ckpt}/export"], "OUT must be outside the checkpoint"),
    "OUT is the base": (["{run}", "{tiny_wan}", "--base", "{tiny_wan}", "--overwrite"], "replaces only an export"),
    "recipe.yaml names an unknown family": (["{bad_family}", "{new}"], "family: unknown family 'wan3'"),
    "recipe.yaml is not YAML": (["{bad_yaml}", "{new}"], "cannot read the run's recipe"),
    "recipe.yaml is not YAML, with --base": (["{bad_yaml}", "{new}", "--base", "{tiny_wan}"],
                                             "cannot read the run's recipe"),
    "unknown option": (["{run}", "{new}", "--shards", "3"], "unrecognized arguments: --shards"),
    "OUT missing": (["{run}"], "the following arguments are required: out"),
}


def hashes(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> content hash (a folder: 'dir', a link: its target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_convert_mistake_is_one_line_and_changes_nothing(world, name):
    argv, phrase = CASES[name]
    argv = [a.format(**world) for a in argv]
    watched = (world["root"], world["tiny_wan"])
    before = [hashes(w) for w in watched]
    res = run_cli([PYTHON, TOOL, *argv])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (name, res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, name
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, res.stderr)
    assert phrase in lines[0], (name, lines[0])
    assert [hashes(w) for w in watched] == before, name  # the export, the user's files, checkpoint, base: untouched
