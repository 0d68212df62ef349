"""ZeRO-3 checkpoint -> Diffusers safetensors (ds_distill.export): exact against DeepSpeed's zero_to_fp32,
loads and runs in diffusers, EMA export, and one-line errors that leave no half-written output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, deepspeed_cmd, dmd2_recipe, finetune_recipe, train_in_process, write_recipe
from ds_distill import export

QUIET = {"log": lambda *a, **k: None}


# -- fixtures: two real training runs, started together --------------------------------------------------------
@pytest.fixture(scope="module")
def odd_wan(tiny_wan, tmp_path_factory) -> Path:
    """The tiny Wan with an odd FFN width, so some parameters have odd sizes and 2-rank partitions carry padding."""
    from ds_distill.models.tiny import TinyWanConfig, build_tiny_transformer

    d = tmp_path_factory.mktemp("models") / "odd_wan"
    d.mkdir()
    for entry in tiny_wan.iterdir():
        if entry.name != "transformer":
            (d / entry.name).symlink_to(entry)
    torch.manual_seed(1)
    build_tiny_transformer(TinyWanConfig(ffn_dim=255)).save_pretrained(d / "transformer")
    return d


SMALL = dict(max_train_steps=2, checkpointing_steps=1, train_batch_size=2, trackers=[])


@pytest.fixture(scope="module")
def dmd_proc(odd_wan, toy_data, tmp_path_factory):
    """A 2-rank DMD2 run with EMA (student + critic trainable), started in the background so in-process work
    overlaps it: 2 steps, a checkpoint after each."""
    root = tmp_path_factory.mktemp("export_dmd")
    recipe = write_recipe(root / "dmd.yaml", dmd2_recipe(odd_wan, toy_data, root / "dmd", method={"ema_decay": 0.9},
                                                         **SMALL))
    proc = subprocess.Popen(deepspeed_cmd(2, recipe), cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, root / "dmd"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def runs(bf16_dmd2_started, dmd_proc, odd_wan, toy_data, dist_env, tmp_path_factory) -> dict[str, Path]:
    """The DMD2 run above plus a 1-rank finetune (2 steps, checkpoints at 1 and 2) trained meanwhile in process
    (the session's bf16 DMD2 runs, which the bf16 tests read, start first and run meanwhile too)."""
    root = tmp_path_factory.mktemp("export_ft")
    ft = train_in_process(write_recipe(root / "ft.yaml", finetune_recipe(odd_wan, toy_data, root / "ft", **SMALL)),
                          dist_env)
    proc, dmd = dmd_proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return {"ft": ft, "dmd": dmd}


def fp32_weights(checkpoint: Path, role: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own reading of a role's weights (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=role)


def read_export(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported transformer folder, checking the index (if any) names each file's tensors."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    index = folder / export.INDEX_NAME
    if len(files) > 1:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(out)
        for f in files:
            assert {k for k, v in weight_map.items() if v == f.name} == set(load_file(str(f)))
    else:
        assert files[0].name == export.WEIGHTS_NAME and not index.exists()
    return out


def assert_equal_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def exports(runs, odd_wan, tmp_path_factory) -> dict[str, Path]:
    """The exports most tests read, each converted once."""
    root = tmp_path_factory.mktemp("exports")
    ft2, dmd2 = runs["ft"] / "checkpoint-2", runs["dmd"] / "checkpoint-2"
    jobs = {
        "ft": (runs["ft"], {}),  # an output_dir: its latest
        "dmd": (dmd2, {"max_shard_size": "150KB"}),
        "dmd_bf16": (dmd2, {"dtype": "bf16", "max_shard_size": "150KB"}),
        "critic": (dmd2 / "critic", {}),  # a role folder
        "ema": (dmd2, {"ema": True}),
        "ema_step1": (runs["dmd"] / "checkpoint-1", {"ema": True}),
        "pipeline": (dmd2, {"base": odd_wan}),
    }
    assert ft2.is_dir()
    for name, (src, kw) in jobs.items():
        export.convert(src, root / name, **kw, **QUIET)
    return {name: root / name for name in jobs}


# -- exactness --------------------------------------------------------------------------------------------------
def test_fp32_export_equals_zero_to_fp32_one_and_two_ranks(runs, exports):
    dmd2 = runs["dmd"] / "checkpoint-2"
    ref1 = fp32_weights(runs["ft"] / "checkpoint-2", "student")
    assert_equal_dicts(read_export(exports["ft"] / "transformer"), ref1)
    ref2 = fp32_weights(dmd2, "student")
    assert len(list((exports["dmd"] / "transformer").glob("*.safetensors"))) > 2  # really sharded
    assert_equal_dicts(read_export(exports["dmd"] / "transformer"), ref2)
    assert_equal_dicts(read_export(exports["critic"] / "transformer"), fp32_weights(dmd2, "critic"))
    # an odd-sized parameter: each rank held 128 values (one of them padding), cut back to 255
    from safetensors import safe_open

    with safe_open(str(dmd2 / "student" / "ema" / "rank-00001-of-00002.safetensors"), "pt") as h:
        assert h.get_slice("blocks.0.ffn.net.0.proj.bias").get_shape() == [128]
    assert ref2["blocks.0.ffn.net.0.proj.bias"].shape == (255,)


def test_bf16_export_equals_fp32_result_cast(runs, exports):
    ref = {k: v.to(torch.bfloat16) for k, v in fp32_weights(runs["dmd"] / "checkpoint-2", "student").items()}
    assert_equal_dicts(read_export(exports["dmd_bf16"] / "transformer"), ref)


def test_config_comes_from_the_recipe_or_base(odd_wan, exports):
    want = (odd_wan / "transformer" / "config.json").read_text()
    for name in ("ft", "pipeline"):
        assert (exports[name] / "transformer" / "config.json").read_text() == want


# -- diffusers --------------------------------------------------------------------------------------------------
def reference_model(odd_wan: Path, weights: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(odd_wan / "transformer"))
    model.load_state_dict(weights, strict=True)
    return model.eval()


def forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 8, 8, generator=g)
    text = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([250.0, 750.0]), encoder_hidden_states=text,
                     return_dict=False)[0]


def test_export_loads_in_diffusers_and_reproduces_the_trained_model(runs, exports, odd_wan):
    from diffusers import WanTransformer3DModel

    for name, ckpt in (("ft", runs["ft"] / "checkpoint-2"), ("dmd", runs["dmd"] / "checkpoint-2")):
        loaded = WanTransformer3DModel.from_pretrained(exports[name] / "transformer").eval()
        ref = reference_model(odd_wan, fp32_weights(ckpt, "student"))
        a, b = forward(loaded), forward(ref)
        assert torch.equal(a, b), name
        assert not torch.equal(a, forward(WanTransformer3DModel.from_pretrained(odd_wan / "transformer"))), name

    bf16 = WanTransformer3DModel.from_pretrained(exports["dmd_bf16"] / "transformer", torch_dtype=torch.bfloat16)
    ref = fp32_weights(runs["dmd"] / "checkpoint-2", "student")
    for k, v in bf16.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16).to(v.dtype)), k


def test_pipeline_export_loads_and_samples(exports, odd_wan):
    from diffusers import WanPipeline

    out = exports["pipeline"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in odd_wan.iterdir())
    pipe = WanPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    mine = read_export(out / "transformer")
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, mine[k]), k
    video = pipe("a red ball bouncing on the floor", num_inference_steps=2, height=32, width=32, num_frames=5,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert video.shape == (1, 5, 32, 32, 3) and video.std() > 0


def test_link_base_symlinks_components(runs, odd_wan, tmp_path):
    out = tmp_path / "linked"
    assert export.main([str(runs["dmd"] / "checkpoint-2"), str(out), "--base", str(odd_wan), "--link-base"]) == 0
    assert (out / "vae").is_symlink() and (out / "vae").resolve() == (odd_wan / "vae").resolve()
    assert not (out / "transformer").is_symlink() and (out / "model_index.json").is_file()


# -- EMA --------------------------------------------------------------------------------------------------------
def ema_reassembled(role_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA partitions put back together here, independently of the converter."""
    from safetensors import safe_open

    files = sorted((role_dir / "ema").glob("rank-*.safetensors"))
    parts, shapes = [], None
    for f in files:
        with safe_open(str(f), "pt") as h:
            shapes = json.loads(h.metadata()["shapes"])
            parts.append({k: h.get_tensor(k) for k in h.keys()})
    return {k: torch.cat([p[k] for p in parts])[:torch.Size(s).numel()].view(s) for k, s in shapes.items()}


def test_ema_export(runs, exports, odd_wan):
    from safetensors.torch import load_file

    dmd = runs["dmd"]
    assert len(list((dmd / "checkpoint-2" / "student" / "ema").iterdir())) == 2
    got = read_export(exports["ema"] / "transformer")
    assert_equal_dicts(got, ema_reassembled(dmd / "checkpoint-2" / "student"))
    # Stronger, from the weights alone: the student steps on even steps only, so after step 1 the EMA is still the
    # starting model, and after step 2 it is one update: init + (1 - decay) * (w2 - init).
    init = load_file(str(odd_wan / "transformer" / export.WEIGHTS_NAME))
    assert_equal_dicts(read_export(exports["ema_step1"] / "transformer"), init)
    w2 = fp32_weights(dmd / "checkpoint-2", "student")
    assert any(not torch.equal(got[k], w2[k]) for k in got)
    for k in got:
        torch.testing.assert_close(got[k], init[k].lerp(w2[k], 0.1), rtol=1e-6, atol=1e-7, msg=k)


# -- errors -----------------------------------------------------------------------------------------------------
def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def bad_cases(runs, odd_wan, tiny_wan, tmp: Path) -> dict[str, tuple[list[str], str]]:
    dmd, ft = runs["dmd"], runs["ft"]
    ckpt2 = str(dmd / "checkpoint-2")
    cases = {"missing path": ([str(tmp / "nope")], "does not exist"),
             "not a checkpoint": ([str(odd_wan)], "not a ds_distill checkpoint"),
             "unknown role": ([ckpt2, "--role", "teacher"], "no trainable role 'teacher'"),
             "no ema": ([str(ft / "checkpoint-2"), "--ema"], "has no EMA weights"),
             "wrong base": ([ckpt2, "--base", str(tiny_wan)], "does not fit the transformer config"),
             "base not a pipeline": ([ckpt2, "--base", str(tiny_wan / "vae")], "not a Diffusers pipeline")}
    partial = copy_run(dmd / "checkpoint-2", tmp / "partial" / "checkpoint-2")
    (partial / "trainer_state.json").unlink()
    cases["interrupted save"] = ([str(partial)], "no trainer_state.json")
    no_rank = copy_run(dmd, tmp / "no_rank")
    (no_rank / "checkpoint-2" / "student" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    cases["missing rank file"] = ([str(no_rank / "checkpoint-2")], "rank_1_mp_rank_00_optim_states.pt is missing")
    truncated = copy_run(dmd, tmp / "truncated")
    f = truncated / "checkpoint-2" / "student" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    cases["truncated rank file"] = ([str(truncated / "checkpoint-2")], "cannot be read")
    no_ema_rank = copy_run(dmd, tmp / "no_ema_rank")
    (no_ema_rank / "checkpoint-2" / "student" / "ema" / "rank-00001-of-00002.safetensors").unlink()
    cases["missing EMA rank"] = ([str(no_ema_rank / "checkpoint-2"), "--ema"], "00001-of-00002.safetensors is missing")
    no_recipe = copy_run(dmd, tmp / "no_recipe")
    (no_recipe / "recipe.yaml").unlink()
    cases["no config"] = ([str(no_recipe)], "pass --base")
    empty_run = tmp / "empty_run"
    (empty_run / "checkpoint-3").mkdir(parents=True)
    cases["no complete checkpoint"] = ([str(empty_run)], "holds no complete checkpoint")
    return cases


def assert_one_line_exit_2(capsys, argv: list[str], expect: str) -> None:
    capsys.readouterr()  # what came before (e.g. zero_to_fp32's progress bars) is not this command's output
    with pytest.raises(SystemExit) as exc:
        export.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]


def test_bad_folders_fail_in_one_line_and_write_nothing(runs, odd_wan, tiny_wan, tmp_path, capsys):
    for name, (args, expect) in bad_cases(runs, odd_wan, tiny_wan, tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        assert_one_line_exit_2(capsys, [args[0], str(out), *args[1:]], expect)
        assert not out.exists(), name
        assert not list(out.parent.glob(f"{out.name}*")), name


def test_failure_while_writing_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def disk_full_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_second_shard)
    out = tmp_path / "out"
    assert_one_line_exit_2(capsys, [str(runs["dmd"]), str(out), "--max-shard-size", "150KB"], "No space left")
    assert len(calls) == 2 and not out.exists() and not list(tmp_path.glob("out*"))


def test_existing_output_is_kept_unless_overwrite(runs, tmp_path, capsys):
    """A non-empty OUT is refused; --overwrite replaces only an earlier export (once the new one is complete),
    never a folder of the user's nor a model from elsewhere."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_exit_2(capsys, [str(runs["ft"]), str(out)], "not empty; pass --overwrite")
    assert_one_line_exit_2(capsys, [str(runs["ft"]), str(out), "--overwrite"], "replaces only an export")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert export.main([str(runs["dmd"]), str(out)]) == 0
    (out / "transformer" / "extra.txt").write_text("x")  # files of ours inside an export go with it
    assert export.is_export(out)
    assert export.main([str(runs["ft"]), str(out), "--overwrite"]) == 0
    assert not (out / "transformer" / "extra.txt").exists()
    assert_equal_dicts(read_export(out / "transformer"), fp32_weights(runs["ft"] / "checkpoint-2", "student"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing aside is left behind
    model = tmp_path / "model"
    shutil.copytree(out / "transformer", model / "transformer")
    for f in (model / "transformer").glob("*.safetensors"):  # the same files without our mark: not ours
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    assert not export.is_export(model)
    assert_one_line_exit_2(capsys, [str(runs["ft"]), str(model), "--overwrite"], "replaces only an export")


# -- bf16 runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_bf16_export_equals_zero_to_fp32(bf16_dmd2_runs, world, tmp_path):
    """A bf16 run (three distinct roles, threshold 0; DeepSpeed names its optimizer files bf16_zero_pp_rank_*):
    master weights equal DeepSpeed's zero_to_fp32 bit for bit (student and critic, fp32 and bf16 output);
    --ema equals the EMA partitions reassembled here, and is not the master weights."""
    ckpt = bf16_dmd2_runs[world] / "checkpoint-4"
    assert sorted(p.name for p in (ckpt / "student").glob("*_optim_states.pt")) == \
        [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    for role in ("student", "critic"):
        export.convert(ckpt, tmp_path / role, role=role, max_shard_size="150KB", **QUIET)
        ref = fp32_weights(ckpt, role)
        assert_equal_dicts(read_export(tmp_path / role / "transformer"), ref)
    export.convert(ckpt, tmp_path / "bf16", dtype="bf16", **QUIET)
    assert_equal_dicts(read_export(tmp_path / "bf16" / "transformer"),
                       {k: v.to(torch.bfloat16) for k, v in fp32_weights(ckpt, "student").items()})
    export.convert(ckpt, tmp_path / "ema", ema=True, **QUIET)
    got = read_export(tmp_path / "ema" / "transformer")
    assert_equal_dicts(got, {k: v.float() for k, v in ema_reassembled(ckpt / "student").items()})
    master = fp32_weights(ckpt, "student")
    assert any(not torch.equal(got[k], master[k]) for k in got)
    if world == 2:  # an odd-sized tensor: 128 values per rank (one of them padding), cut back to 255
        assert got["blocks.0.ffn.net.0.proj.bias"].shape == (255,)


def test_bf16_missing_rank_file_is_named(bf16_dmd2_runs, tmp_path, capsys):
    run = copy_run(bf16_dmd2_runs[2], tmp_path / "run")
    (run / "checkpoint-4" / "critic" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_one_line_exit_2(capsys, [str(run), str(tmp_path / "out"), "--role", "critic"],
                           "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing")
    mixed = run / "checkpoint-4" / "student"
    shutil.copy(mixed / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                mixed / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert_one_line_exit_2(capsys, [str(run), str(tmp_path / "out")], "bf16 and an fp32 run mixed")
    assert not (tmp_path / "out").exists()


def test_page_dropping_keeps_values(tmp_path):
    """Dropped pages of a mapped file read back the same; anonymous memory is never touched."""
    t = torch.randn(100_000)
    torch.save({"flat": [t]}, tmp_path / "f.pt")
    mapped = export._torch_load(tmp_path / "f.pt")["flat"][0]
    dropper = export._PageDropper([tmp_path / "f.pt"])
    dropper.refresh()
    assert dropper.regions or not dropper.madvise
    anonymous = t.clone()
    for view in (mapped[1000:50_000], anonymous[1000:50_000]):
        before = view.clone()
        dropper.drop(view)
        assert torch.equal(view, before)
    assert torch.equal(mapped, t) and torch.equal(anonymous, t)


def test_max_shard_size_parsing():
    assert export.parse_size("5GB") == 5 * 10**9 and export.parse_size("2GiB") == 2 * 2**30
    assert export.parse_size("150kb") == 150_000 and export.parse_size("1000") == 1000
    for bad in ("five", "0MB", "5XB"):
        with pytest.raises(export.UserError):
            export.parse_size(bad)


def test_tool_runs_from_a_checkout(tmp_path):
    """The thin wrapper: no install needed, and a bad folder is one line on stderr, exit 2."""
    res = subprocess.run([PYTHON, str(REPO / "tools" / "convert_zero_to_safetensors.py"), str(tmp_path / "nope"),
                          str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], res.stderr
