"""`ds-distill demo`: the whole pipeline end to end on the embedded default, on a CPU, in minutes.

tiny Wan2.1 + toy data -> finetune a teacher -> export it -> DMD2-distil a 4-step student (with validation
videos) -> export the student -> load the export in diffusers.WanPipeline and render a video -> print the
quality table (data / teacher@50 / teacher@4 / student@4 / student@1) and where every artefact is.
Each training stage is the real `python -m ds_distill.train` on a shipped recipe, as a user would run it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ds_distill.engines import PACKAGE_ROOT
from ds_distill.cli import ArgumentParser, check_output_dir
from ds_distill.errors import UserError, exit_on_user_error

RECIPES = PACKAGE_ROOT / "recipes"


class Stages:
    """Prints a header per stage and how long each took."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[tuple[str, float]] = []

    def run(self, title: str, fn):
        print(f"\n=== {title}", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.times.append((title, time.perf_counter() - t0))
        return out

    def total(self) -> float:
        return time.perf_counter() - self.start


def _subprocess(cmd: list[str], env: dict) -> None:
    """Run a stage as its own process (DeepSpeed initialises once per process), output streamed."""
    res = subprocess.run(cmd, env=env)
    if res.returncode != 0:
        raise UserError(f"demo stage failed (exit {res.returncode}): {' '.join(cmd)}")


def render_with_wanpipeline(model_dir: Path, out: Path, prompt: str, steps: int, size: dict) -> Path:
    """Load an exported pipeline directory with plain diffusers and render one mp4."""
    import torch
    from diffusers import WanPipeline
    from diffusers.utils import export_to_video

    pipe = WanPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(0), output_type="np", **size).frames[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(out), fps=8)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="ds-distill demo", description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default outputs/demo)")
    p.add_argument("--finetune-steps", type=int, default=None, help="teacher finetune steps (recipe default)")
    p.add_argument("--dmd-steps", type=int, default=None, help="DMD2 iterations (recipe default)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per training stage (deepspeed launcher when > 1)")
    args = p.parse_args(argv)
    for flag, value in (("--finetune-steps", args.finetune_steps), ("--dmd-steps", args.dmd_steps),
                        ("--nproc", args.nproc)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.nproc > 1 and not (Path(sys.executable).parent / "deepspeed").is_file():
        raise UserError(f"--nproc {args.nproc}: needs the deepspeed launcher beside {sys.executable}")
    out = Path(args.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output-dir {out}: exists and is not empty; pick a new folder or remove it")
    check_output_dir(out, "--output-dir", overwrite=False)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    torch_threads = int(env["OMP_NUM_THREADS"])
    import torch

    torch.set_num_threads(torch_threads)
    paths = {k: out / k for k in ("tiny_wan", "toy_data", "teacher_run", "teacher", "dmd2_run", "student", "renders")}
    stages = Stages()

    def train(recipe: str, overrides: list[str]):
        launch = [py, "-m", "ds_distill.train"] if args.nproc == 1 else [
            str(Path(py).parent / "deepspeed"), "--num_gpus", str(args.nproc), "--module", "ds_distill.train"]
        _subprocess(launch + ["--config", str(RECIPES / recipe), *overrides], env)

    from ds_distill.models.tiny import make_tiny_wan
    from ds_distill.utils.toy_data import make_toy_data

    stages.run("1/7 tiny Wan2.1 (random weights, made offline)", lambda: make_tiny_wan(paths["tiny_wan"]))
    stages.run("2/7 toy dataset (known mixture per caption)",
               lambda: make_toy_data(paths["toy_data"], paths["tiny_wan"]))
    ft = [f"roles.student.path={paths['tiny_wan']}", f"training.data_path={paths['toy_data'] / 'latents'}",
          f"training.output_dir={paths['teacher_run']}",
          f"training.validation_dataset_file={paths['toy_data'] / 'validation.json'}"]
    if args.finetune_steps:
        ft.append(f"training.max_train_steps={args.finetune_steps}")
    stages.run("3/7 finetune the teacher (recipes/tiny_finetune.yaml)", lambda: train("tiny_finetune.yaml", ft))
    convert = [py, "-m", "ds_distill.export"]
    stages.run("4/7 export the teacher", lambda: _subprocess(
        convert + [str(paths["teacher_run"]), str(paths["teacher"]), "--base", str(paths["tiny_wan"])], env))
    dmd = [f"roles.{r}.path={paths['teacher']}" for r in ("student", "teacher", "critic")] + [
        f"training.data_path={paths['toy_data'] / 'text_only'}", f"training.output_dir={paths['dmd2_run']}",
        f"training.validation_dataset_file={paths['toy_data'] / 'validation.json'}"]
    if args.dmd_steps:
        dmd.append(f"training.max_train_steps={args.dmd_steps}")
    stages.run("5/7 DMD2: distil a 4-step student (recipes/tiny_dmd2.yaml)", lambda: train("tiny_dmd2.yaml", dmd))
    stages.run("6/7 export the student", lambda: _subprocess(
        convert + [str(paths["dmd2_run"]), str(paths["student"]), "--base", str(paths["teacher"])], env))

    from ds_distill.evaluate import EvalSpec, evaluate, format_table
    from ds_distill.utils.config import load_recipe

    steps = load_recipe(RECIPES / "tiny_dmd2.yaml").method_config["dmd_denoising_steps"]
    size = {"height": 32, "width": 32, "num_frames": 5}

    def render_and_score():
        video = render_with_wanpipeline(paths["student"], paths["renders"] / "student_wanpipeline.mp4",
                                        "a red ball bouncing on the floor", len(steps), size)
        print(f"diffusers.WanPipeline loaded {paths['student']} and rendered {video}")
        specs = [
            EvalSpec("teacher@50 ode", str(paths["teacher"]), "ode", steps=50),
            EvalSpec(f"teacher@{len(steps)} sde", str(paths["teacher"]), "sde", raw_timesteps=steps),
            EvalSpec(f"student@{len(steps)} sde", str(paths["student"]), "sde", raw_timesteps=steps),
            EvalSpec("student@1 sde", str(paths["student"]), "sde", raw_timesteps=steps[:1]),
        ]
        return evaluate(specs, paths["toy_data"], base=paths["teacher"])

    rows = stages.run("7/7 render with diffusers.WanPipeline and score against the toy distribution",
                      render_and_score)
    table = format_table(rows)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    by = {r["label"]: r for r in rows}
    student, teacher = by[f"student@{len(steps)} sde"], by[f"teacher@{len(steps)} sde"]
    reference = by["teacher@50 ode"]
    closer = student["mode_dist"] < teacher["mode_dist"]
    # a student that lands on fewer modes than the many-step teacher has not distilled it, however close it lands
    keeps_modes = student["coverage"] >= reference["coverage"]
    verdict = "beats" if closer and keeps_modes else "does NOT beat"
    validation = sorted((paths["dmd2_run"] / "validation").glob("step-*"))
    print("\n" + table)
    print(f"\nstudent@{len(steps)} {verdict} teacher@{len(steps)} "
          f"(mode_dist {student['mode_dist']:.3f} vs {teacher['mode_dist']:.3f}, lower is closer to the data; "
          f"coverage {student['coverage']:.3f} vs teacher@50's {reference['coverage']:.3f}, "
          f"{'every mode kept' if keeps_modes else 'modes LOST'})")
    print("\nartefacts:")
    for label, path in [("tiny Wan (random init)", paths["tiny_wan"]), ("toy dataset", paths["toy_data"]),
                        ("teacher run (checkpoints, TensorBoard logs/)", paths["teacher_run"]),
                        ("teacher export (Diffusers)", paths["teacher"]),
                        ("DMD2 run (checkpoints, logs/, validation/)", paths["dmd2_run"]),
                        ("validation videos", validation[-1] if validation else paths["dmd2_run"] / "validation"),
                        ("student export (Diffusers, WanPipeline-loadable)", paths["student"]),
                        ("WanPipeline render", paths["renders"] / "student_wanpipeline.mp4"),
                        ("quality table", out / "quality.json")]:
        print(f"  {label:<50} {path}")
    print("\ntimes: " + ", ".join(f"{t.split(' ')[0]} {s:.0f}s" for t, s in stages.times)
          + f"; total {stages.total() / 60:.1f} min")
    print(f"TensorBoard: tensorboard --logdir {out}")
    return 0 if verdict == "beats" else 1


if __name__ == "__main__":
    sys.exit(main())
