"""DMD2's GAN term on real ZeRO-3 engines (threshold 0) against independent plain-PyTorch computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from conftest import deepspeed_cmd, dmd2_recipe, read_metrics, run_cli, train_cmd, write_recipe
from ds_distill.dispatch import build_runtime, check_recipe
from ds_distill.engines import Strategy
from ds_distill.errors import RecipeError
from ds_distill.methods.distribution_matching.gan import (GAN_HEAD, GanHead, critic_gan_loss,
                                                          generator_gan_loss)
from ds_distill.utils import rng
from ds_distill.utils.config import load_recipe
from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

SHIFT, W = 3.0, 2.0
W_GEN, W_CRITIC = 0.7, 0.3
BLOCKS = [1, -1]
GAN = {"gan_loss_weight_gen": W_GEN, "gan_loss_weight_critic": W_CRITIC, "gan_feature_blocks": BLOCKS}


# -- the losses on fixed tensors --------------------------------------------------------------------------------
def test_gan_losses_and_gradients_on_fixed_tensors():
    """log(1 + e^x) written out, and its derivative sigmoid(x) / B, against the module's losses and autograd."""
    fake = torch.tensor([-2.0, -0.5, 0.0, 1.5], requires_grad=True)
    real = torch.tensor([3.0, 0.25, -1.0, 0.0], requires_grad=True)
    n = 4
    ref_c = (torch.log(1 + torch.exp(fake.detach())) + torch.log(1 + torch.exp(-real.detach()))).sum() / n
    ref_g = torch.log(1 + torch.exp(-fake.detach())).sum() / n
    lc = critic_gan_loss(fake, real)
    gf, gr = torch.autograd.grad(lc, (fake, real))
    assert float(lc) == pytest.approx(float(ref_c), rel=1e-6)
    sig = lambda x: 1 / (1 + torch.exp(-x.detach()))  # noqa: E731
    torch.testing.assert_close(gf, sig(fake) / n, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gr, -sig(-real) / n, rtol=1e-6, atol=1e-7)
    lg = generator_gan_loss(fake)
    (gg,) = torch.autograd.grad(lg, fake)
    assert float(lg) == pytest.approx(float(ref_g), rel=1e-6)
    torch.testing.assert_close(gg, -sig(-fake) / n, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_head_matches_its_documented_formula(kind):
    """Per block: LayerNorm without affine, then mean over tokens (or one learned query's softmax attention);
    concatenate, Linear -> SiLU -> Linear."""
    torch.manual_seed(0)
    head = GanHead(8, 2, kind, hidden=5)
    feats = [torch.randn(3, 6, 8), torch.randn(3, 6, 8)]
    pooled = []
    for i, f in enumerate(feats):
        h = (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5)
        if kind == "mean":
            pooled.append(h.mean(1))
        else:
            k = h @ head.keys[i].weight.T + head.keys[i].bias
            a = torch.softmax((k @ head.queries[i]) / 8 ** 0.5, dim=1)
            pooled.append((a.unsqueeze(-1) * h).sum(1))
    x = torch.cat(pooled, 1) @ head.fc1.weight.T + head.fc1.bias
    ref = (x * torch.sigmoid(x)) @ head.fc2.weight.T + head.fc2.bias
    torch.testing.assert_close(head(feats), ref.squeeze(1), rtol=1e-5, atol=1e-6)


# -- in the run ------------------------------------------------------------------------------------------------
def make_runtime(dist_env, tiny_wan, toy_data, out, method):
    recipe = dmd2_recipe(tiny_wan, toy_data, out, method, train_batch_size=2, max_grad_norm=0.0,
                         data_path=str(toy_data / "latents"), gradient_checkpointing=True)
    checked = check_recipe(load_recipe(write_recipe(out.parent / f"{out.name}.yaml", recipe)))
    rt = build_runtime(checked, Strategy(dist_env))
    rt.loader = TrainLoader(ParquetDataset(toy_data / "latents", 16, need_latents=True), 2, 0, 1, seed=0)
    return rt


@pytest.fixture(scope="module")
def runtime(dist_env, tiny_wan, toy_data, tmp_path_factory):
    return make_runtime(dist_env, tiny_wan, toy_data, tmp_path_factory.mktemp("gan") / "out", GAN)


def plain(tiny_wan):
    return WanTransformer3DModel.from_pretrained(tiny_wan / "transformer").float()


def full_weights(module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def full_grads(module) -> dict[str, torch.Tensor | None]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p) for n, p in module.named_parameters()}


def plain_head(rt) -> GanHead:
    weights = full_weights(getattr(rt.method.critic.module, GAN_HEAD))
    head = GanHead(64, len(BLOCKS), "mean")
    head.load_state_dict(weights)
    return head


def shifted(raw: torch.Tensor) -> torch.Tensor:
    u = raw / 1000.0
    return 1000.0 * SHIFT * u / (1 + (SHIFT - 1) * u)


def tapped(model, x, t, cond) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Velocity and the outputs of blocks 1 and 3 (= -1 of 4), captured by hand."""
    got = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o)) for i in (1, 3)]
    v = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()
    for h in hooks:
        h.remove()
    return v, [got[1], got[3]]


def gan_t(ids, extra):
    return shifted(rng.per_sample_rand(ids, 0, "timestep", extra=extra) * 1000).clamp(20.0, 980.0)


def test_head_lives_in_the_critics_engine(runtime):
    """The head's parameters are ZeRO-3 parameters of the critic's one engine (its optimizer steps them); blocks
    resolve against the critic's depth."""
    m = runtime.method
    head = getattr(m.critic.module, GAN_HEAD)
    params = list(head.parameters())
    assert params and all(hasattr(p, "ds_id") and p.requires_grad for p in params)
    in_optimizer = {id(p) for group in m.critic.engine.optimizer.fp16_groups for p in group}
    assert all(id(p) in in_optimizer for p in params)
    assert not any(hasattr(p, "ds_id") and id(p) in in_optimizer for p in m.student.module.parameters())
    assert m.config.gan_feature_blocks == [1, 3]


def test_critic_loss_with_gan_matches_independent_computation(runtime, tiny_wan):
    """flow matching + W_CRITIC * (softplus(D(fake)) + softplus(-D(real))), real latents and student samples noised
    at the same t: loss and the critic's gradients (transformer and head) against plain PyTorch."""
    from test_dmd2 import reference_sample

    m, a = runtime.method, runtime.adapter
    raw = next(runtime.loader)
    b = a.prepare_batch(raw, latents_source="data")
    head = plain_head(runtime)
    step = 3
    loss = m.critic_loss(b, step)
    a.backward(m.critic, loss)
    got = full_grads(m.critic.module)
    m.critic.engine.optimizer.zero_grad()

    student, critic = plain(tiny_wan), plain(tiny_wan)
    ids, shape, cond = b.sample_ids, b.latent_shape, b.cond.float()
    k = rng.shared_randint(4, 0, "critic_rollout", step)
    x0 = reference_sample(student, ids, shape, cond, k, "critic_rollout", grad=False)
    t = shifted(rng.per_sample_rand(ids, 0, "critic_timestep") * 1000).clamp(20.0, 980.0)
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    eps = rng.per_sample_randn(shape, ids, 0, "critic_noise")
    fm = F.mse_loss(critic(hidden_states=(1 - s) * x0 + s * eps, timestep=t, encoder_hidden_states=cond,
                           return_dict=False)[0], eps - x0)
    tg = gan_t(ids, 1002)
    sg = (tg / 1000).view(-1, 1, 1, 1, 1)
    xf = (1 - sg) * x0 + sg * rng.per_sample_randn(shape, ids, 0, "noise", extra=1020)
    xr = (1 - sg) * b.latents + sg * rng.per_sample_randn(shape, ids, 0, "noise", extra=1021)
    d_fake = head(tapped(critic, xf, tg, cond)[1])
    d_real = head(tapped(critic, xr, tg, cond)[1])
    ref = fm + W_CRITIC * (F.softplus(d_fake) + F.softplus(-d_real)).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for n, p in critic.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    for n, p in head.named_parameters():
        torch.testing.assert_close(got[f"{GAN_HEAD}.{n}"], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert float(got[f"{GAN_HEAD}.fc2.weight"].abs().max()) > 0


def test_gan_max_timestep_ratio_caps_only_the_gan_noise(runtime):
    """gan_max_timestep_ratio clamps the GAN's noising timesteps (both streams), not the score timesteps; unset, the
    GAN follows max_timestep_ratio."""
    m, a = runtime.method, runtime.adapter
    b = a.prepare_batch(next(runtime.loader), latents_source="data")
    ids = b.sample_ids
    score = m.score_timesteps(b, "critic_timestep")
    assert m.config.gan_max_timestep_ratio is None
    torch.testing.assert_close(m.gan_timesteps(b, "gan_timestep"), gan_t(ids, 1001), rtol=1e-6, atol=1e-4)
    streams = (("gan_timestep", 1001), ("critic_gan_timestep", 1002))
    free = {s: gan_t(ids, extra) for s, extra in streams}
    drawn = torch.cat(list(free.values()))
    cap = float(drawn.min() + drawn.max()) / 2  # some draws above the cap, some below
    m.config.gan_max_timestep_ratio = cap / 1000
    try:
        for stream, _ in streams:
            torch.testing.assert_close(m.gan_timesteps(b, stream), free[stream].clamp(max=cap), rtol=1e-6, atol=1e-4)
        assert bool((drawn > cap).any()) and bool((drawn < cap).any())
        torch.testing.assert_close(m.score_timesteps(b, "critic_timestep"), score, rtol=0, atol=0)
    finally:
        m.config.gan_max_timestep_ratio = None


def test_student_step_with_gan_matches_reference_and_leaves_critic_and_teacher(runtime, tiny_wan):
    """DMD loss + W_GEN * softplus(-D(fake)) through the frozen critic and head: the student's gradients match
    plain PyTorch; the student step changes neither the critic (head included) nor the teacher and leaves the
    critic no gradient; the critic's own step still trains afterwards."""
    from test_dmd2 import model_v, reference_sample

    m, a = runtime.method, runtime.adapter
    b = a.prepare_batch(next(runtime.loader), latents_source="data")
    head = plain_head(runtime)
    critic0, teacher0 = full_weights(m.critic.module), full_weights(m.teacher.module)
    step = 2
    with m.critic_frozen():
        loss = m.generator_loss(b, step)
        a.backward(m.student, loss)
        got = full_grads(m.student.module)
        critic_grads = full_grads(m.critic.module)
        assert m.strategy.step(m.student.engine)
    assert all(g is None or float(g.abs().max()) == 0 for g in critic_grads.values())
    critic1, teacher1 = full_weights(m.critic.module), full_weights(m.teacher.module)
    assert all(torch.equal(critic0[n], critic1[n]) for n in critic0)
    assert all(torch.equal(teacher0[n], teacher1[n]) for n in teacher0)
    assert all(p.requires_grad for p in m.critic.module.parameters())  # unfrozen again

    student, critic, teacher = plain(tiny_wan), plain(tiny_wan), plain(tiny_wan)
    for p in list(critic.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    ids, shape, cond = b.sample_ids, b.latent_shape, b.cond.float()
    k = rng.shared_randint(4, 0, "rollout_noise", step)
    x0_gen = reference_sample(student, ids, shape, cond, k, "rollout_noise", grad=True)
    with torch.no_grad():
        t = shifted(rng.per_sample_rand(ids, 0, "score_timestep") * 1000).clamp(20.0, 980.0)
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0_gen + s * rng.per_sample_randn(shape, ids, 0, "score_noise")
        fake = x_t - s * model_v(critic, x_t, t, cond)
        real_c = x_t - s * model_v(teacher, x_t, t, cond)
        real = real_c + W * (real_c - (x_t - s * model_v(teacher, x_t, t, b.uncond.float())))
        g = (fake - real) / (x0_gen - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    dmd = 0.5 * F.mse_loss(x0_gen, (x0_gen - g).detach())
    tg = gan_t(ids, 1001)
    sg = (tg / 1000).view(-1, 1, 1, 1, 1)
    xg = (1 - sg) * x0_gen + sg * rng.per_sample_randn(shape, ids, 0, "noise", extra=1010)
    ref = dmd + W_GEN * F.softplus(-head(tapped(critic, xg, tg, cond)[1])).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # the critic's next step (flow matching + GAN) runs and moves the critic and its head
    loss = m.critic_loss(b, step)
    assert m.update(m.critic, loss, step)
    critic2 = full_weights(m.critic.module)
    assert not torch.equal(critic1[f"{GAN_HEAD}.fc2.weight"], critic2[f"{GAN_HEAD}.fc2.weight"])


def test_weight_zero_is_todays_dmd2(dist_env, tiny_wan, toy_data, tmp_path):
    """gan_loss_weight_gen 0 with every other GAN knob set == no GAN keys at all: same losses, same weights, no
    head, text-only batches (latents not read) -- three iterations, student stepping on the even ones."""
    plain_rt = make_runtime(dist_env, tiny_wan, toy_data, tmp_path / "plain", None)
    zero_rt = make_runtime(dist_env, tiny_wan, toy_data, tmp_path / "zero",
                           {**GAN, "gan_loss_weight_gen": 0.0, "gan_head": "attention", "gan_timestep": "uniform"})
    assert not hasattr(zero_rt.method.critic.module, GAN_HEAD)
    for step in (2, 3, 4):
        raw = next(plain_rt.loader)
        assert torch.equal(raw["sample_ids"], next(zero_rt.loader)["sample_ids"])
        want = plain_rt.method.train_one_step([raw], step)
        got = zero_rt.method.train_one_step([raw], step)
        assert got == want and "student/gan_loss" not in got
    for role in ("student", "critic"):
        wa = full_weights(plain_rt.method.bundle[role].module)
        wb = full_weights(zero_rt.method.bundle[role].module)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), role


def test_gan_on_text_only_data_is_a_recipe_error(tiny_wan, toy_data, tmp_path):
    recipe = dmd2_recipe(tiny_wan, toy_data, tmp_path / "out", GAN, data_path=str(toy_data / "text_only"))
    with pytest.raises(RecipeError, match=r"training.data_path: .* no vae_latent columns .*gan_loss_weight_gen"):
        check_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    for bad, key in (({"gan_loss_weight_critic": 0.0}, "gan_loss_weight_critic"),
                     ({"gan_feature_blocks": []}, "gan_feature_blocks"),
                     ({"gan_loss_weight_gen": -1.0}, "gan_loss_weight_gen"),
                     ({"gan_feature_blocks": [7]}, r"gan_feature_blocks: block 7 does not exist \(the critic has 4"),
                     ({"gan_feature_blocks": [1, -3]}, "gan_feature_blocks: .* names a block twice"),
                     ({"gan_max_timestep_ratio": 0.01}, r"gan_max_timestep_ratio: must be in \(min_timestep_ratio")):
        recipe = dmd2_recipe(tiny_wan, toy_data, tmp_path / "out", {**GAN, **bad},
                             data_path=str(toy_data / "latents"))
        with pytest.raises(RecipeError, match=f"method_config.{key}"):
            check_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))


def test_bad_gan_blocks_stop_the_run_before_anything_is_written(tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    recipe = dmd2_recipe(tiny_wan, toy_data, out, {**GAN, "gan_feature_blocks": [1, 4]},
                         data_path=str(toy_data / "latents"))
    res = run_cli(train_cmd(write_recipe(tmp_path / "r.yaml", recipe)))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if "method_config.gan_feature_blocks" in x]
    assert len(lines) == 1 and "block 4 does not exist" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()


def test_two_ranks_match_one_rank_with_gan(tiny_wan, toy_data, tmp_path):
    """GAN on, threshold 0, checkpointing on, 6 iterations (student on even ones), same global batch on 1 rank (2)
    and 2 ranks (1 each): the same losses (DMD, flow matching and both GAN terms) and the same critic head."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    runs = {}
    for nproc, micro in ((1, 2), (2, 1)):
        out = tmp_path / f"g{nproc}"
        recipe = dmd2_recipe(tiny_wan, toy_data, out, GAN, max_train_steps=6, train_batch_size=micro,
                             data_path=str(toy_data / "latents"), dataloader_num_workers=0,
                             gradient_checkpointing=True, checkpointing_steps=6, trackers=[])
        path = write_recipe(tmp_path / f"g{nproc}.yaml", recipe)
        res = run_cli(train_cmd(path) if nproc == 1 else deepspeed_cmd(2, path), timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[nproc] = out
    a, b = read_metrics(runs[1]), read_metrics(runs[2])
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert ("student/gan_loss" in x) == (x["step"] % 2 == 0) and "critic/gan_loss" in x
        for k in ("critic/loss", "student/loss", "critic/gan_loss", "student/gan_loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), (x["step"], k)
    heads = [{k: v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-6"), tag="critic").items()
              if k.startswith(GAN_HEAD)} for out in (runs[1], runs[2])]
    assert heads[0] and heads[0].keys() == heads[1].keys()
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-4, atol=1e-6, msg=k)
    # the GAN run's checkpoint (critic with head) resumed into a GAN-off run: one line, exit 2, nothing written
    assert_resume_refused(runs[1], tmp_path, {**GAN, "gan_loss_weight_gen": 0.0}, "holds DMD2's GAN head")


def assert_resume_refused(out, tmp_path, method: dict, message: str, training: dict | None = None) -> None:
    """`--resume latest` of the run in `out` with the GAN setting `method` stops with one line naming the critic's
    checkpoint, exit 2, and leaves the run folder as it was."""
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    recipe = load_recipe_dict(out / "recipe.yaml", method)
    recipe["training"].update(training or {})
    res = run_cli(train_cmd(write_recipe(tmp_path / "resume.yaml", recipe), "--resume", "latest"))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if message in x]
    assert len(lines) == 1 and "/critic: --resume:" in lines[0] and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def load_recipe_dict(path, method: dict) -> dict:
    """The recipe a run wrote into its folder, with 8 steps and `method` as its method_config."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    recipe["training"]["max_train_steps"] = 8
    recipe["method_config"] = {**recipe["method_config"], **method}
    return recipe


def test_plain_checkpoint_resumed_with_gan_on_is_refused(bf16_dmd2_runs, toy_data, tmp_path):
    """A DMD2 checkpoint without the head (the session's 1-rank bf16 DMD2 run, which other tests read too), resumed
    with the GAN term on: one line, exit 2, nothing written."""
    assert_resume_refused(bf16_dmd2_runs[1], tmp_path, GAN, "holds no GAN head",
                          training={"data_path": str(toy_data / "latents")})


@pytest.mark.parametrize("name, steps, gan", [
    ("tiny_dmd2", 4, 0.0), ("tiny_dmd2_1step", 1, 0.0), ("tiny_dmd2_gan", 4, 0.01), ("tiny_dmd2_gan_1step", 1, 0.05),
    ("wan2.1_t2v_1.3B_dmd2_gan_4steps", 4, 0.03), ("wan2.1_t2v_1.3B_dmd2_8steps", 8, 0.0)])
def test_shipped_dmd2_recipes(name, steps, gan):
    """The shipped DMD2 recipes check, keep the whole score-timestep range, let the critic keep up with the student
    (more steps or a faster lr), and read latents exactly when the GAN term is on."""
    from conftest import REPO

    checked = check_recipe(load_recipe(str(REPO / "recipes" / f"{name}.yaml")))
    cfg = checked.method_config
    assert len(cfg.dmd_denoising_steps) == steps and cfg.gan_loss_weight_gen == gan
    assert (cfg.min_timestep_ratio, cfg.max_timestep_ratio) == (0.02, 0.98)
    critic_lr = cfg.critic_learning_rate or checked.recipe.training.learning_rate
    assert cfg.generator_update_interval > 1 or critic_lr > checked.recipe.training.learning_rate
    assert checked.method_cls.needs_latents(cfg) == (gan > 0)
    assert str(checked.recipe.training.data_path).endswith("latents" if gan else "text_only")
