"""Shared fixtures: a tiny real Wan, a toy dataset, a one-process DeepSpeed group, subprocess runners."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The stock templates with stage3_param_persistence_threshold 0: every tensor of the tiny model is partitioned, so
# training tests run ZeRO-3's gather / release / prefetch as the real model's parameters do.
TRAIN_T0 = REPO / "tests" / "ds_configs" / "zero3_train_t0.json"
INFERENCE_T0 = REPO / "tests" / "ds_configs" / "zero3_inference_t0.json"

# Quiet, deterministic, and no oversubscription of the 2 cores.
os.environ.setdefault("DS_DISTILL_NO_TQDM", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins (often 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """A complete tiny Wan2.1 T2V directory (made offline, once per session)."""
    from ds_distill.models.tiny import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("models") / "tiny_wan")


@pytest.fixture(scope="session")
def toy_data(tiny_wan, tmp_path_factory) -> Path:
    """The toy dataset encoded with the tiny Wan's text encoder."""
    from ds_distill.utils.toy_data import ToyDataConfig, make_toy_data

    return make_toy_data(tmp_path_factory.mktemp("data") / "toy", tiny_wan, ToyDataConfig(rows_per_caption=16))


@pytest.fixture(scope="session")
def dist_env():
    """A one-process DeepSpeed/gloo group for in-process engine tests (initialised once per session)."""
    from ds_distill.engines import init_distributed

    return init_distributed()


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def finetune_recipe(tiny_wan: Path, toy_data: Path, out: Path, **training) -> dict:
    """A small finetune recipe dict over the fixtures."""
    t = {
        "output_dir": str(out),
        "data_path": str(toy_data / "latents"),
        "max_train_steps": 4,
        "train_batch_size": 4,
        "dataloader_num_workers": 0,
        "mixed_precision": "fp32",
        "learning_rate": 1e-3,
        "max_grad_norm": 1.0,
        "text_len": 16,
        "num_frames": 5,
        "height": 32,
        "width": 32,
        "gradient_checkpointing": False,
        "checkpointing_steps": 0,
        "trackers": ["tensorboard"],
        "ds_config": str(TRAIN_T0),
        "ds_config_inference": str(INFERENCE_T0),
    }
    t.update(training)
    return {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": str(tiny_wan), "trainable": True}},
        "training": t,
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"weighting_scheme": "logit_normal"},
    }


def dmd2_recipe(teacher: Path, data_dir: Path, out: Path, method: dict | None = None, **training) -> dict:
    """A small DMD2 recipe dict: student and critic start from the teacher."""
    r = finetune_recipe(teacher, data_dir, out, **training)
    r["recipe"]["method"] = "dmd2"
    r["roles"] = {
        "student": {"path": str(teacher), "trainable": True},
        "teacher": {"path": str(teacher), "trainable": False},
        "critic": {"path": str(teacher), "trainable": True},
    }
    r["training"].setdefault("data_path", str(data_dir / "text_only"))
    r["method_config"] = {
        "rollout_mode": "simulate",
        "dmd_denoising_steps": [1000, 750, 500, 250],
        "generator_update_interval": 2,
        "real_score_guidance_scale": 2.0,
        **(method or {}),
    }
    return r


@pytest.fixture(scope="session")
def three_wans(tmp_path_factory) -> dict[str, Path]:
    """Student, teacher and critic with different weights (tiny Wans of seeds 1, 2, 3). FFN width 255: some
    tensors have odd sizes, so 2-rank partitions carry padding."""
    from ds_distill.models.tiny import TinyWanConfig, make_tiny_wan

    root = tmp_path_factory.mktemp("roles")
    return {role: make_tiny_wan(root / role, TinyWanConfig(seed=seed, ffn_dim=255))
            for role, seed in (("student", 1), ("teacher", 2), ("critic", 3))}


def three_role_dmd2_recipe(roles: dict[str, Path], data_dir: Path, out: Path, method: dict | None = None,
                           **training) -> dict:
    """dmd2_recipe with each role read from its own folder (`three_wans`)."""
    r = dmd2_recipe(roles["teacher"], data_dir, out, method, **training)
    for name, path in roles.items():
        r["roles"][name]["path"] = str(path)
    return r


# The production regime at tiny size: bf16, threshold 0, three distinct roles, checkpointing, EMA; 4 iterations
# with the student stepping on even ones, checkpoints after 2 and 4. Same global batch on 1 and 2 ranks.
BF16_DMD2 = dict(max_train_steps=4, checkpointing_steps=2, mixed_precision="bf16", gradient_checkpointing=True,
                 dataloader_num_workers=0, trackers=[])
BF16_DMD2_METHOD = {"ema_decay": 0.9, "generator_update_interval": 2}


@pytest.fixture(scope="session")
def bf16_dmd2_started(three_wans, toy_data, tmp_path_factory):
    """Start the 1-rank (batch 2) and 2-rank (1 per rank) bf16 DMD2 runs in the background; `bf16_dmd2_runs`
    waits for them. Requesting this first lets a module's in-process work overlap them."""
    root = tmp_path_factory.mktemp("bf16_dmd2")
    procs = {}
    for nproc in (1, 2):
        out = root / f"ranks{nproc}"
        recipe = write_recipe(root / f"ranks{nproc}.yaml", three_role_dmd2_recipe(
            three_wans, toy_data, out, BF16_DMD2_METHOD, train_batch_size=2 // nproc,
            data_path=str(toy_data / "text_only"), **BF16_DMD2))
        cmd = train_cmd(recipe) if nproc == 1 else deepspeed_cmd(2, recipe)
        launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
        env["OMP_NUM_THREADS"] = "1"
        procs[nproc] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="session")
def bf16_dmd2_runs(bf16_dmd2_started) -> dict[int, Path]:
    """{ranks: output_dir} of the two finished bf16 DMD2 runs."""
    outs = {}
    for nproc, (proc, out) in bf16_dmd2_started.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{nproc} rank(s):\n" + log[-4000:]
        outs[nproc] = out
    return outs


def build_in_process(recipe_path: Path, dist_env):
    """What `python -m ds_distill.train --config R` builds before training, on the session's one-rank process
    group: (runtime, dataset, output_dir)."""
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.engines import Strategy
    from ds_distill.utils.config import dump_recipe, load_recipe
    from ds_distill.utils.dataloader import ParquetDataset

    recipe = load_recipe(str(recipe_path))
    checked = check_recipe(recipe)
    out = Path(recipe.training.output_dir)
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    runtime = build_runtime(checked, Strategy(dist_env))
    dataset = ParquetDataset(recipe.training.data_path, recipe.training.text_len,
                             checked.method_cls.needs_latents(checked.method_config))
    return runtime, dataset, out


def train_in_process(recipe_path: Path, dist_env) -> Path:
    """What `python -m ds_distill.train --config R` does, on the session's one-rank process group."""
    from ds_distill.trainer import Trainer

    runtime, dataset, out = build_in_process(recipe_path, dist_env)
    Trainer(runtime, dataset).train()
    return out


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run a command line; returns CompletedProcess with text output."""
    # The in-process one-rank group (dist_env) put its rendezvous in os.environ; a child must make its own.
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    full_env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_cmd(recipe: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "ds_distill.train", "--config", str(recipe), *extra]


def deepspeed_cmd(nproc: int, recipe: Path, *extra: str) -> list[str]:
    """`deepspeed --num_gpus N --module ds_distill.train ...` on the CPU accelerator."""
    return [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", "ds_distill.train", "--config", str(recipe), *extra]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
