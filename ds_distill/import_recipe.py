"""`ds-distill import-recipe FASTVIDEO.yaml OUT.yaml`: a FastVideo `fastvideo/train` run config as a schema-v2 recipe.

FastVideo's layout: `models.<role>` ({_target_, init_from, trainable, ...}), `method` ({_target_, knobs}),
`training.{distributed, data, optimizer, loop, checkpoint, tracker, model, vsa}`, `callbacks.{grad_clip, ema,
validation, ...}` and `pipeline`. Each key is either carried to its counterpart here or listed -- one line per key,
with what to do -- on stdout and as comments at the top of OUT.yaml. The importer consumes the keys it maps from a
copy of the input and lists whatever is left, so nothing is dropped without a line. The result is checked as a
recipe before anything is written; OUT.yaml is replaced only with --overwrite.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from ds_distill.errors import RecipeError, UserError, exit_on_user_error
from ds_distill.utils.tracking import wandb_installed

MODEL_TARGETS = {"fastvideo.train.models.wan.WanModel": "wan"}
METHOD_TARGETS = {
    "fastvideo.train.methods.distribution_matching.dmd2.DMD2Method": "dmd2",
    "fastvideo.train.methods.fine_tuning.finetune.FineTuneMethod": "finetune",
}
CALLBACK_TARGETS = {
    "grad_clip": "fastvideo.train.callbacks.grad_clip.GradNormClipCallback",
    "ema": "fastvideo.train.callbacks.ema.EMACallback",
    "validation": "fastvideo.train.callbacks.validation.ValidationCallback",
}
LR_SCHEDULERS = ("constant", "linear", "cosine")
_MISSING = object()


class Importer:
    """Builds the recipe while consuming the FastVideo mapping; `notes` holds one line per key left behind."""

    def __init__(self, raw: dict, source: str):
        self.raw = copy.deepcopy(raw)
        self.source = source
        self.notes: list[str] = []
        self.training: dict[str, Any] = {}
        self.method_config: dict[str, Any] = {}
        self.pipeline: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def take(self, section: dict | None, key: str, default: Any = _MISSING) -> Any:
        """Pop a key from a section of the input (the key is then accounted for)."""
        if not isinstance(section, dict) or key not in section:
            return default
        return section.pop(key)

    def note(self, key: str, value: Any, advice: str) -> None:
        self.notes.append(f"{key}: {_show(value)} -- {advice}")

    def number(self, value: Any, key: str, kind: type = float):
        """`kind(value)` for a numeric key of the input; anything else is one line naming the key."""
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{self.source}: {key}: expected {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None

    def betas(self, value: Any, key: str) -> list[float]:
        """Adam betas written as a list or as FastVideo's "0.9,0.999" string."""
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or len(parts) != 2:
            raise RecipeError(f"{self.source}: {key}: expected two numbers (a list or \"b1,b2\"), got {value!r}")
        return [self.number(b, key) for b in parts]

    def unmapped(self, section: dict | None, key: str, where: str, advice: str) -> None:
        """Take a key that has no counterpart here and, when it was set, list it as `where.key` with advice."""
        value = self.take(section, key, None)
        if value is not None:
            self.note(f"{where}.{key}", value, advice)

    def section(self, parent: dict, name: str, where: str) -> dict:
        value = parent.get(name)
        if value is None:
            parent.pop(name, None)
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"{self.source}: {where}: expected a mapping, got {type(value).__name__}")
        return value

    # -- the sections -----------------------------------------------------------------------------
    def run(self) -> dict:
        raw = self.raw
        models = self.section(raw, "models", "models")
        method = self.section(raw, "method", "method")
        if not models or "_target_" not in method:
            raise RecipeError(f"{self.source}: not FastVideo's fastvideo/train layout (expected `models:` with "
                              f"`_target_`/`init_from` per role and `method:` with `_target_`)")
        method_name = self.method_name(method)
        roles, family = self.roles(models)
        training = self.section(raw, "training", "training")
        self.distributed(self.section(training, "distributed", "training.distributed"))
        self.data(self.section(training, "data", "training.data"), method_name)
        self.optimizer(self.section(training, "optimizer", "training.optimizer"))
        self.loop(self.section(training, "loop", "training.loop"))
        self.checkpoint(self.section(training, "checkpoint", "training.checkpoint"))
        self.tracker(training)
        self.model_section(self.section(training, "model", "training.model"), method_name)
        self.training_rest(training)
        callbacks = self.section(raw, "callbacks", "callbacks")
        self.callbacks(callbacks, method_name)
        self.method_knobs(method, method_name)
        self.pipeline_section(raw)
        self.leftovers(raw)
        for ours, theirs in (("output_dir", "training.checkpoint.output_dir"), ("data_path", "training.data.data_path")):
            if ours not in self.training:
                raise RecipeError(f"{self.source}: {theirs}: required key is missing (a recipe needs it)")
        return {
            "recipe": {"family": family, "method": method_name},
            "roles": roles,
            "training": self.training,
            "pipeline_config": self.pipeline,
            "method_config": self.method_config,
        }

    def method_name(self, method: dict) -> str:
        target = method.pop("_target_")
        if target not in METHOD_TARGETS:
            known = ", ".join(f"{t.rsplit('.', 1)[-1]} ({n})" for t, n in METHOD_TARGETS.items())
            raise RecipeError(f"{self.source}: method._target_: {target} has no counterpart here (methods: {known})")
        return METHOD_TARGETS[target]

    def roles(self, models: dict) -> tuple[dict, str]:
        roles, families = {}, set()
        for name in list(models):
            spec = models[name]
            where = f"models.{name}"
            if not isinstance(spec, dict) or "_target_" not in spec or "init_from" not in spec:
                raise RecipeError(f"{self.source}: {where}: expected a mapping with _target_ and init_from")
            target = spec.pop("_target_")
            if target not in MODEL_TARGETS:
                raise RecipeError(f"{self.source}: {where}._target_: {target} has no counterpart here (model "
                                  f"families: {', '.join(f'{t} ({f})' for t, f in MODEL_TARGETS.items())})")
            families.add(MODEL_TARGETS[target])
            role: dict[str, Any] = {"path": str(spec.pop("init_from")), "trainable": bool(spec.pop("trainable", True))}
            ckpt = self.take(spec, "enable_gradient_checkpointing_type")
            if ckpt is not _MISSING:
                role["gradient_checkpointing"] = self.checkpointing(f"{where}.enable_gradient_checkpointing_type",
                                                                    ckpt)
            lora = self.take(spec, "lora", None)
            if isinstance(lora, dict) and lora.get("enable", True):
                lora.pop("enable", None)
                role["lora"] = self.lora(lora, f"{where}.lora")
            elif isinstance(lora, dict):
                self.note(f"{where}.lora", lora, "LoRA is off there, so the role trains all its weights here too; "
                          "nothing imported")
            elif lora is not None:
                self.note(f"{where}.lora", lora, "expected a mapping (rank, alpha, target_modules, ...); set "
                          f"roles.{name}.lora by hand")
            self.unmapped(spec, "disable_custom_init_weights", where, "nothing to do: roles load their "
                          "Diffusers weights as they are (no custom initialisation here)")
            self.unmapped(spec, "attention_backend", where, "no per-role attention backend here: every role "
                          "uses torch's scaled_dot_product_attention (dense)")
            for key in list(spec):
                self.note(f"{where}.{key}", spec.pop(key), "no counterpart for this model option; remove it, or "
                          "set the matching roles.<name> key by hand (see README, recipe keys)")
            roles[name] = role
            models.pop(name)
        if len(families) != 1:
            raise RecipeError(f"{self.source}: models: roles of several families {sorted(families)}")
        return roles, families.pop()

    def checkpointing(self, key: str, value: Any) -> bool:
        if value in (None, False, "none"):
            return False
        if value != "full":
            self.note(key, value, "activation checkpointing here is whole transformer blocks (like `full`); "
                      "imported as gradient_checkpointing: true")
        return True

    def lora(self, lora: dict, where: str) -> dict:
        out: dict[str, Any] = {}
        for ours, theirs in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout")):
            value = self.take(lora, theirs, None)
            if value is not None:
                out[ours] = value
        modules = self.take(lora, "target_modules", None)
        if modules is not None:
            # peft matches module names by suffix; diffusers' output projection is the Linear `to_out.0`
            modules = [modules] if isinstance(modules, str) else modules
            out["target_modules"] = ["to_out.0" if m == "to_out" else m for m in modules]
        for key in list(lora):
            self.note(f"{where}.{key}", lora.pop(key), "no counterpart among roles.<name>.lora keys (rank, alpha, "
                      "target_modules, dropout, init); remove it")
        return out

    def distributed(self, d: dict) -> None:
        num_gpus = self.take(d, "num_gpus", None)
        if num_gpus is not None:
            num_gpus = self.training["num_gpus"] = self.number(num_gpus, "training.distributed.num_gpus", int)
        sp = self.take(d, "sp_size", None)
        world = num_gpus or 1
        if sp is not None:
            sp = self.number(sp, "training.distributed.sp_size", int)
            if sp > 1:
                self.training["sp_size"] = sp
        elif world > 1:  # FastVideo's default: each video split over all GPUs
            self.note("training.distributed.sp_size", f"unset (= num_gpus {world})", "training.sp_size defaults to "
                      f"1 here (every rank trains its own samples, so the global batch is {world}x FastVideo's); set "
                      f"training.sp_size: {world} to split each video over all ranks as FastVideo does")
        reduce_dtype = self.take(d, "reduce_dtype", None)
        if reduce_dtype is not None:
            self.training["grad_reduce_dtype"] = str(reduce_dtype)
        tp = self.take(d, "tp_size", None)
        if tp is not None and self.number(tp, "training.distributed.tp_size", int) != 1:
            self.note("training.distributed.tp_size", tp, "tensor parallelism is not available here; remove it "
                      "(ZeRO-3 partitions parameters over all ranks instead)")
        for key in ("hsdp_replicate_dim", "hsdp_shard_dim", "reshard_after_forward", "fsdp_modules_per_group",
                    "fsdp_symmetric_memory"):
            self.unmapped(d, key, "training.distributed", "FSDP setting: ZeRO-3 shards every trainable role "
                          "over all ranks here; tune ds_configs/zero3_train.json (or training.ds_config) instead")
        self.unmapped(d, "pin_cpu_memory", "training.distributed", "no counterpart; for host offload set "
                      "training.offload_param (frozen roles) or the DeepSpeed template's offload settings")
        self.rest(d, "training.distributed")

    def data(self, d: dict, method: str) -> None:
        for ours, theirs in (("data_path", "data_path"), ("dataloader_num_workers", "dataloader_num_workers"),
                             ("train_batch_size", "train_batch_size"), ("seed", "seed"),
                             ("num_frames", "num_frames"), ("height", "num_height"), ("width", "num_width")):
            value = self.take(d, theirs, None)
            unset = value is None or value == "" or (value == 0 and ours in ("num_frames", "height", "width"))
            if not unset:  # FastVideo writes 0 for a size it takes from the data
                self.training[ours] = value
        if isinstance(self.training.get("data_path"), dict):
            self.training["data_path"] = {str(k): self.number(v, f"training.data.data_path.{k}", int)
                                          for k, v in self.training["data_path"].items()}
        self.unmapped(d, "num_latent_t", "training.data", "nothing to do: latent frames follow from num_frames "
                      "and the VAE here")
        self.unmapped(d, "preprocessed_data_type", "training.data", "nothing to do: the loader reads the "
                      "parquet columns (latents + text, or text only) and the method says which it needs")
        cfg_rate = self.take(d, "training_cfg_rate", None)
        if cfg_rate is not None:
            cfg_rate = self.number(cfg_rate, "training.data.training_cfg_rate")
            if method == "finetune":
                self.method_config["training_cfg_rate"] = cfg_rate
            elif cfg_rate != 0.0:
                self.note("training.data.training_cfg_rate", cfg_rate, "dmd2 has no condition dropout here; "
                          "remove it")
        self.rest(d, "training.data")

    def optimizer(self, o: dict) -> None:
        for ours, theirs in (("learning_rate", "learning_rate"), ("weight_decay", "weight_decay"),
                             ("lr_warmup_steps", "lr_warmup_steps"), ("fused_optimizer", "fused")):
            value = self.take(o, theirs, None)
            if value is not None:
                self.training[ours] = value
        betas = self.take(o, "betas", None)
        if betas is not None:
            self.training["betas"] = self.betas(betas, "training.optimizer.betas")
        sched = self.take(o, "lr_scheduler", None)
        if sched is not None:
            if sched in LR_SCHEDULERS:
                self.training["lr_scheduler"] = sched
            else:
                self.note("training.optimizer.lr_scheduler", sched, f"not available here ({', '.join(LR_SCHEDULERS)}"
                          f"); the imported recipe uses constant -- set training.lr_scheduler to one of these")
        for key in ("lr_num_cycles", "lr_power", "min_lr_ratio"):
            self.unmapped(o, key, "training.optimizer", "no counterpart (schedules here: constant, linear "
                          "and cosine to 0 after warm-up); remove it")
        self.rest(o, "training.optimizer")

    def loop(self, lo: dict) -> None:
        for key in ("max_train_steps", "gradient_accumulation_steps"):
            value = self.take(lo, key, None)
            if value is not None:
                self.training[key] = value
        self.rest(lo, "training.loop")

    def checkpoint(self, ck: dict) -> None:
        for ours, theirs in (("output_dir", "output_dir"), ("checkpointing_steps", "training_state_checkpointing_steps"),
                             ("checkpoints_total_limit", "checkpoints_total_limit")):
            value = self.take(ck, theirs, None)
            if value not in (None, ""):
                self.training[ours] = value
        value = self.take(ck, "resume_from_checkpoint", None)
        if value:
            self.note("training.checkpoint.resume_from_checkpoint", value, "resuming is a command-line choice "
                      "here: add `--resume latest` (or --resume CHECKPOINT_FOLDER) to the training command")
        self.unmapped(ck, "weight_only_checkpointing_steps", "training.checkpoint", "no weight-only checkpoints "
                      "during training; export weights from any checkpoint with `ds-distill convert`")
        self.rest(ck, "training.checkpoint")

    def tracker(self, training: dict) -> None:
        tr = self.section(training, "tracker", "training.tracker")
        trackers = self.take(tr, "trackers", None)
        project = self.take(tr, "project_name", None)
        # FastVideo logs to wandb unless told otherwise (its project name defaults to `fastvideo`)
        trackers = [trackers] if isinstance(trackers, str) else trackers
        if trackers is None and wandb_installed():
            trackers = ["wandb"]
        elif trackers is None:
            trackers = ["tensorboard"]
            self.note("training.tracker.trackers", "unset (FastVideo: wandb)", "wandb is not installed here, so "
                      "the recipe logs to tensorboard; `pip install wandb` and set training.trackers: [wandb] for it")
        elif not trackers:
            trackers = ["none"]
        self.training["trackers"] = list(trackers)
        self.training["tracker_project_name"] = str(project or "fastvideo")
        run_name = self.take(tr, "run_name", None)
        if run_name:
            self.training["wandb_run_name"] = str(run_name)
        entity = self.take(tr, "entity", None)
        if entity:
            self.note("training.tracker.entity", entity, f"set the environment variable WANDB_ENTITY={entity} "
                      f"when launching")
        training.pop("tracker", None)
        self.rest(tr, "training.tracker")

    def model_section(self, m: dict, method: str) -> None:
        value = self.take(m, "enable_gradient_checkpointing_type", _MISSING)
        if value is not _MISSING:
            self.training["gradient_checkpointing"] = self.checkpointing(
                "training.model.enable_gradient_checkpointing_type", value)
        finetune_knobs = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
        for key in finetune_knobs:
            value = self.take(m, key, None)
            if value is None:
                continue
            if method == "finetune":
                self.method_config[key] = value
            else:
                self.note(f"training.model.{key}", value, "dmd2 draws its score timesteps uniformly, then shifts "
                          "and clamps them (min/max_timestep_ratio); remove it")
        for key in ("min_timestep_ratio", "max_timestep_ratio"):
            value = self.take(m, key, None)
            if value is not None:
                if method == "dmd2":
                    self.method_config[key] = self.number(value, f"training.model.{key}")
                else:
                    self.note(f"training.model.{key}", value, "finetune samples the whole schedule; remove it")
        value = self.take(m, "enable_torch_compile", None)
        if value:
            self.note("training.model.enable_torch_compile", value, "torch.compile is not applied here; remove it")
        value = self.take(m, "moba_config", None)
        if value:
            self.note("training.model.moba_config", value, "sparse (MoBA) attention is not available here; "
                      "attention is dense")
        self.rest(m, "training.model")

    def training_rest(self, training: dict) -> None:
        vsa = self.section(training, "vsa", "training.vsa")
        for key in list(vsa):
            self.note(f"training.vsa.{key}", vsa.pop(key), "video sparse attention is not available here; "
                      "attention is dense")
        training.pop("vsa", None)
        self.unmapped(training, "dit_precision", "training", "nothing to do: master weights are fp32 here; the "
                      "compute dtype is training.mixed_precision (bf16 by default)")
        value = self.take(training, "model_path", None)
        if value:
            self.note("training.model_path", value, "roles.<name>.path names each role's folder; remove it")
        for key in ("distributed", "data", "optimizer", "loop", "checkpoint", "model"):
            if training.get(key) == {}:
                training.pop(key)
        self.rest(training, "training")

    def callbacks(self, callbacks: dict, method: str) -> None:
        clip = self.section(callbacks, "grad_clip", "callbacks.grad_clip")
        if "grad_clip" in callbacks:
            self.check_target(clip, "grad_clip")
            value = self.take(clip, "max_grad_norm", None)
            if value is not None:
                self.training["max_grad_norm"] = self.number(value, "callbacks.grad_clip.max_grad_norm")
            callbacks.pop("grad_clip")
            self.rest(clip, "callbacks.grad_clip")
        else:
            self.training["max_grad_norm"] = 0.0  # FastVideo clips only with the callback
        ema = self.section(callbacks, "ema", "callbacks.ema")
        if "ema" in callbacks:
            self.check_target(ema, "ema")
            if method == "dmd2":
                for ours, theirs in (("ema_decay", "decay"), ("ema_start_step", "start_iter")):
                    value = self.take(ema, theirs, None)
                    if value is not None:
                        self.method_config[ours] = value
            else:
                for key in list(ema):
                    self.note(f"callbacks.ema.{key}", ema.pop(key), "finetune keeps no EMA here (dmd2 does: "
                              "method_config.ema_decay); remove it")
            callbacks.pop("ema")
            self.rest(ema, "callbacks.ema")
        val = self.section(callbacks, "validation", "callbacks.validation")
        if "validation" in callbacks:
            self.validation(val, method)
            callbacks.pop("validation")
        for name in list(callbacks):
            self.note(f"callbacks.{name}", callbacks.pop(name), "this callback has no counterpart here; remove it")

    def check_target(self, section: dict, name: str) -> None:
        target = self.take(section, "_target_", None)
        if target is not None and target != CALLBACK_TARGETS[name]:
            self.note(f"callbacks.{name}._target_", target, f"a custom callback; imported as the stock {name} "
                      f"behaviour -- port its extra logic by hand if it matters")

    def validation(self, v: dict, method: str) -> None:
        self.check_target(v, "validation")
        dataset = self.take(v, "dataset_file", None)
        if dataset:
            self.training["log_validation"] = True
            self.training["validation_dataset_file"] = str(dataset)
        for ours, theirs in (("validation_steps", "every_steps"), ("validation_guidance_scale", "guidance_scale")):
            value = self.take(v, theirs, None)
            if value is not None:
                self.training[ours] = value
        steps = self.take(v, "sampling_steps", None)
        if steps is not None:
            self.training["validation_sampling_steps"] = steps if isinstance(steps, list) else [steps]
        timesteps = self.take(v, "sampling_timesteps", None)
        if timesteps is not None:
            self.note("callbacks.validation.sampling_timesteps", timesteps, "dmd2 validates with its own "
                      "method_config.dmd_denoising_steps (SDE); finetune with validation_sampling_steps (ODE); "
                      "nothing to set")
        kind = self.take(v, "sampler_kind", None)
        if kind is not None:
            self.pipeline["sampler_kind"] = kind
        self.unmapped(v, "pipeline_target", "callbacks.validation", "nothing to do: validation samples the "
                      "student with the method's sampler (dmd2: few-step SDE, finetune: pipeline_config.sampler_kind)")
        value = self.take(v, "run_at_start", None)
        if value is False:
            self.note("callbacks.validation.run_at_start", value, "validation here also runs before the first "
                      "step; set training.log_validation: false to turn validation off altogether")
        for key in ("num_frames", "height", "width"):
            self.unmapped(v, key, "callbacks.validation", f"give `{key}` per prompt in the validation JSON "
                          f"(default: training.{key})")
        self.rest(v, "callbacks.validation")

    def method_knobs(self, method: dict, name: str) -> None:
        attn = self.take(method, "attn_kind", None)
        if attn == "dense":
            self.method_config["attn_kind"] = "dense"
        elif attn is not None:
            self.note("method.attn_kind", attn, "only dense attention is available here; the imported recipe "
                      "trains with dense attention")
        if name == "dmd2":
            rollout = self.take(method, "rollout_mode", None)
            if rollout is not None:
                self.method_config["rollout_mode"] = {"data_latent": "data", "vae_latent": "data",
                                                      "sim": "simulate"}.get(str(rollout).lower(), rollout)
            for key in ("generator_update_interval", "real_score_guidance_scale", "dmd_denoising_steps",
                        "min_timestep_ratio", "max_timestep_ratio"):
                value = self.take(method, key, None)
                if value is not None:
                    self.method_config[key] = value
            # FastVideo uses its list as given unless told to warp it; here warping is the default
            self.method_config["warp_denoising_step"] = bool(self.take(method, "warp_denoising_step", False))
            for ours, theirs in (("critic_learning_rate", "fake_score_learning_rate"),
                                 ("critic_weight_decay", "fake_score_weight_decay")):
                value = self.take(method, theirs, None)
                if value is not None:
                    self.method_config[ours] = self.number(value, f"method.{theirs}")
            betas = self.take(method, "fake_score_betas", None)
            if betas is not None:
                self.method_config["critic_betas"] = self.betas(betas, "method.fake_score_betas")
            sched = self.take(method, "fake_score_lr_scheduler", None)
            if sched is not None and sched != self.training.get("lr_scheduler", "constant"):
                self.note("method.fake_score_lr_scheduler", sched, f"the critic follows training.lr_scheduler "
                          f"({self.training.get('lr_scheduler', 'constant')}) here; set that if both should use "
                          f"{sched}")
            cfg_uncond = self.take(method, "cfg_uncond", None)
            if isinstance(cfg_uncond, dict):
                text = cfg_uncond.pop("text", None)
                if text is not None:
                    policy = {"negative_prompt": "negative_prompt", "zero": "zeros"}.get(str(text).lower())
                    if policy is None:
                        self.note("method.cfg_uncond.text", text, "the unconditional text is the negative prompt "
                                  "or zeros here (training.uncond_embedding)")
                    else:
                        self.training["uncond_embedding"] = policy
                for key in list(cfg_uncond):
                    self.note(f"method.cfg_uncond.{key}", cfg_uncond.pop(key), "no counterpart (text-only models "
                              "here); remove it")
            elif cfg_uncond is not None:
                self.note("method.cfg_uncond", cfg_uncond, "expected a mapping ({text: negative_prompt | zero}); "
                          "set training.uncond_embedding (negative_prompt or zeros) instead")
        for key in list(method):
            self.note(f"method.{key}", method.pop(key), f"no counterpart among {name}'s method_config knobs "
                      f"(README, method knobs); remove it or set the matching knob by hand")

    def pipeline_section(self, raw: dict) -> None:
        pipe = raw.get("pipeline")
        if pipe is None:
            raw.pop("pipeline", None)
            return
        if not isinstance(pipe, dict):
            self.note("pipeline", raw.pop("pipeline"), "a pipeline config file is not read here; copy its "
                      "flow_shift into pipeline_config.flow_shift")
            return
        value = self.take(pipe, "flow_shift", None)
        if value is not None:
            self.pipeline["flow_shift"] = self.number(value, "pipeline.flow_shift")
        kind = self.take(pipe, "sampler_kind", None)
        if kind is not None:
            self.pipeline["sampler_kind"] = kind
        for key in list(pipe):
            self.note(f"pipeline.{key}", pipe.pop(key), "model and sampling settings come from the Diffusers "
                      "folders here (transformer/, vae/, scheduler/); remove it")
        raw.pop("pipeline")

    def rest(self, section: dict, where: str) -> None:
        for key in list(section):
            self.note(f"{where}.{key}", section.pop(key), "no counterpart here; remove it (README lists every "
                      "recipe key)")

    def leftovers(self, raw: dict) -> None:
        for key in ("models", "method", "training", "callbacks"):
            if raw.get(key) in ({}, None):
                raw.pop(key, None)
        self.rest(raw, "(top level)")


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text[:-4].strip() if text.endswith("...") else text
    return text if len(text) <= 80 else text[:77] + "..."


def import_recipe(raw: dict, source: str) -> tuple[dict, list[str]]:
    """(schema-v2 recipe mapping, one line per FastVideo key without a counterpart)."""
    importer = Importer(raw, source)
    recipe = importer.run()
    return recipe, importer.notes


def render(recipe: dict, notes: list[str], source: str) -> str:
    """The recipe as YAML, headed by where it came from and the unmapped keys as comments."""
    head = [f"# Imported from FastVideo run config {source} by `ds-distill import-recipe`."]
    if notes:
        head.append(f"# {len(notes)} key(s) had no counterpart and are not in this recipe:")
        head += [f"#   {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)


def build_parser():
    from ds_distill.cli import ArgumentParser

    p = ArgumentParser(prog="ds-distill import-recipe",
                       description="Write a schema-v2 recipe from a FastVideo fastvideo/train run config; keys "
                                   "without a counterpart are listed, one line each.")
    p.add_argument("fastvideo_yaml", help="FastVideo run config (models:/method:/training:/callbacks:/pipeline:)")
    p.add_argument("out_yaml", help="the recipe to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_YAML if it exists")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from ds_distill.cli import check_output_file
    from ds_distill.dispatch import check_recipe
    from ds_distill.utils.checkpoint import write_text_atomic
    from ds_distill.utils.config import read_yaml, recipe_from_mapping

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    src = Path(args.fastvideo_yaml)
    out = check_output_file(args.out_yaml, "OUT_YAML", args.overwrite)
    if out.resolve() == src.resolve():
        raise UserError(f"OUT_YAML {out}: is the input file; pick another name")
    raw = read_yaml(src)
    recipe, notes = import_recipe(raw, str(src))
    try:
        check_recipe(recipe_from_mapping(copy.deepcopy(recipe), str(out)))
    except RecipeError as exc:
        raise RecipeError(f"{src}: the imported recipe does not validate ({exc}); fix that key in {src.name} and "
                          f"import again") from None
    write_text_atomic(out, render(recipe, notes, str(src)))
    r = recipe["recipe"]
    print(f"wrote {out}: {r['method']} on {r['family']}, roles {', '.join(recipe['roles'])}")
    if notes:
        print(f"{len(notes)} key(s) of {src} have no counterpart here (also listed at the top of {out.name}):")
        for n in notes:
            print(f"  {n}")
    gpus = recipe["training"].get("num_gpus", 1)
    launch = f"deepspeed --num_gpus {gpus} --module ds_distill.train" if gpus > 1 else "python -m ds_distill.train"
    print(f"next: {launch} --config {out} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
