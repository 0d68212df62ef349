"""Recipes (schema v2): parsing, overrides, --print-config, and one-line errors with exit code 2."""
from __future__ import annotations

import copy

import pytest
import yaml

from conftest import PYTHON, dmd2_recipe, finetune_recipe, run_cli, train_cmd, write_recipe
from ds_distill.errors import RecipeError
from ds_distill.utils.config import load_recipe


@pytest.fixture()
def base(tiny_wan, toy_data, tmp_path):
    return finetune_recipe(tiny_wan, toy_data, tmp_path / "out")


def test_overrides_are_typed_and_win(base, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base)
    r = load_recipe(path, ["training.max_train_steps=7", "training.learning_rate=2e-4",
                           "method_config.precondition_outputs=true", "pipeline_config.flow_shift=5"])
    assert r.training.max_train_steps == 7
    assert r.training.learning_rate == pytest.approx(2e-4)
    assert r.method_config["precondition_outputs"] is True
    assert r.pipeline_config.flow_shift == 5.0
    assert r.roles["student"].family == "wan"  # defaults to recipe.family


def test_print_config_shows_resolved_recipe(base, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base)
    res = run_cli(train_cmd(path, "--print-config", "training.max_train_steps=11"))
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["training"]["max_train_steps"] == 11
    assert printed["training"]["seed"] == 0  # defaults are filled in
    assert printed["recipe"] == {"family": "wan", "method": "finetune"}


def _mutations(tiny_wan, toy_data, out):
    """(name, recipe mapping or raw text, overrides, expected fragments of the one-line message)."""
    ft = finetune_recipe(tiny_wan, toy_data, out)
    dmd = dmd2_recipe(tiny_wan, toy_data, out)

    def edit(src, fn):
        r = copy.deepcopy(src)
        fn(r)
        return r

    return [
        ("v1_distill_key", edit(ft, lambda r: r.update(distill={"model": "wan", "method": "dmd2"})), [],
         ["distill:", "recipe: {family", "method_config"]),
        ("unknown_training_key", edit(ft, lambda r: r["training"].update(max_train_step=3)), [],
         ["training.max_train_step:", "unknown key"]),
        ("wrong_type", edit(ft, lambda r: r["training"].update(max_train_steps="many")), [],
         ["training.max_train_steps:", "expected an integer", "'many'"]),
        ("wrong_type_override", ft, ["training.learning_rate=fast"],
         ["training.learning_rate:", "expected a number"]),
        ("bad_literal", edit(ft, lambda r: r["training"].update(mixed_precision="fp8")), [],
         ["training.mixed_precision:", "fp32 | bf16"]),
        ("missing_role", edit(dmd, lambda r: r["roles"].pop("critic")), [],
         ["roles.critic:", "needs role `critic`"]),
        ("trainable_teacher", edit(dmd, lambda r: r["roles"]["teacher"].update(trainable=True)), [],
         ["roles.teacher.trainable:", "frozen"]),
        ("missing_path", edit(ft, lambda r: r["roles"]["student"].update(path=str(out / "nowhere"))), [],
         ["roles.student.path:", "does not exist"]),
        ("unknown_method", edit(ft, lambda r: r["recipe"].update(method="dmd9")), [],
         ["recipe.method:", "unknown method 'dmd9'", "dmd2", "finetune"]),
        ("unknown_family", edit(ft, lambda r: r["recipe"].update(family="hunyuan")), [],
         ["recipe.family:", "unknown family 'hunyuan'", "wan"]),
        ("missing_required", edit(ft, lambda r: r["training"].pop("output_dir")), [],
         ["training.output_dir:", "required key is missing"]),
        ("unknown_method_knob", edit(ft, lambda r: r["method_config"].update(rollout_mode="data")), [],
         ["method_config.rollout_mode:", "unknown key"]),
        ("extra_role", edit(ft, lambda r: r["roles"].update(critic={"path": str(tiny_wan), "trainable": True})), [],
         ["roles.critic:", "does not use role"]),
        ("bad_override_syntax", ft, ["training.max_train_steps"], ["override", "key=value"]),
        ("bad_yaml", "recipe: {family: wan\nroles: [", [], ["not valid YAML", "line"]),
        ("models_section_v1", edit(ft, lambda r: r.update(models=r.pop("roles"))), [],
         ["models:", "roles:"]),
        ("bad_dmd_steps", edit(dmd, lambda r: r["method_config"].update(dmd_denoising_steps=[250, 500])), [],
         ["method_config.dmd_denoising_steps:", "descending"]),
        ("negative_batch", edit(ft, lambda r: r["training"].update(train_batch_size=0)), [],
         ["training.train_batch_size:", "at least 1"]),
    ]


CASES = [
    "v1_distill_key", "unknown_training_key", "wrong_type", "wrong_type_override", "bad_literal", "missing_role",
    "trainable_teacher", "missing_path", "unknown_method", "unknown_family", "missing_required",
    "unknown_method_knob", "extra_role", "bad_override_syntax", "bad_yaml", "models_section_v1", "bad_dmd_steps",
    "negative_batch",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_recipe_is_one_line_exit_2(name, tiny_wan, toy_data, tmp_path, capsys):
    """One line on stderr naming the file and the key, exit code 2, nothing created."""
    cases = {c[0]: c for c in _mutations(tiny_wan, toy_data, tmp_path / "out")}
    assert set(cases) == set(CASES)
    _, recipe, overrides, fragments = cases[name]
    path = tmp_path / "bad.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe)
    else:
        write_recipe(path, recipe)
    from ds_distill.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path), *overrides])
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    if name != "bad_override_syntax":
        assert str(path) in lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not (tmp_path / "out").exists()


def test_bad_recipe_subprocess_has_no_traceback(base, tmp_path):
    base["roles"]["teacher"] = base["roles"]["student"]
    path = write_recipe(tmp_path / "r.yaml", base)
    res = run_cli(train_cmd(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: {path}: roles.teacher: method `finetune` does not use role `teacher` (it uses: student)"
    ]


def test_unknown_cli_option(base, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base)
    res = run_cli([PYTHON, "-m", "ds_distill.train", "--config", str(path), "--resum", "latest"])
    assert res.returncode == 2
    assert "--resum" in res.stderr and "Traceback" not in res.stderr


def test_direct_load_raises_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
