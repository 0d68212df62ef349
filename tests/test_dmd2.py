"""DMD2 on real ZeRO-3 engines (one rank, in process) against an independent plain-PyTorch computation."""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from conftest import dmd2_recipe, three_role_dmd2_recipe, write_recipe
from ds_distill.dispatch import build_runtime, check_recipe
from ds_distill.engines import Strategy
from ds_distill.utils import rng
from ds_distill.utils.config import load_recipe
from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

STEPS_RAW = [1000, 750, 500, 250]
SHIFT = 3.0
W = 2.0


@pytest.fixture(scope="module")
def runtime(dist_env, three_wans, toy_data, tmp_path_factory):
    """Student, teacher and critic with different weights (`three_wans`), ZeRO-3 at persistence threshold 0."""
    tmp = tmp_path_factory.mktemp("dmd2")
    recipe = three_role_dmd2_recipe(three_wans, toy_data, tmp / "out", train_batch_size=2, max_grad_norm=0.0,
                                    data_path=str(toy_data / "text_only"), gradient_checkpointing=True)
    path = write_recipe(tmp / "r.yaml", recipe)
    checked = check_recipe(load_recipe(path))
    rt = build_runtime(checked, Strategy(dist_env))
    ds = ParquetDataset(toy_data / "text_only", 16, need_latents=False)
    rt.loader = TrainLoader(ds, 2, 0, 1, seed=0)
    return rt


def plain(model_dir):
    return WanTransformer3DModel.from_pretrained(model_dir / "transformer").float()


def shifted(raw: torch.Tensor) -> torch.Tensor:
    u = raw / 1000.0
    return 1000.0 * SHIFT * u / (1 + (SHIFT - 1) * u)


def full_grads(module) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in module.named_parameters()}


def full_weights(module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def model_v(model, x, t, cond):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()


def reference_sample(model, ids, shape, cond, k, stream, grad):
    """Simulated rollout written out by hand: SDE steps 0..k-1 without grad, step k with grad."""
    ts = shifted(torch.tensor(STEPS_RAW, dtype=torch.float32))
    x = rng.per_sample_randn(shape, ids, 0, stream, extra=0)
    with torch.no_grad():
        for i in range(k):
            v = model_v(model, x, ts[i].expand(len(ids)), cond)
            x0 = x - ts[i] / 1000 * v
            eps = rng.per_sample_randn(shape, ids, 0, stream, extra=i + 1)
            s = ts[i + 1] / 1000
            x = (1 - s) * x0 + s * eps
    with torch.set_grad_enabled(grad):
        v = model_v(model, x, ts[k].expand(len(ids)), cond)
        return x - ts[k] / 1000 * v


def score_t(ids, stream, floor=None):
    """The score timesteps: uniform raw, shifted, in [20, 980]; above a floor, uniform raw between the raw
    timesteps whose shifts are the floor and 980 (the shifted distribution conditioned on t >= floor)."""
    u = rng.per_sample_rand(ids, 0, stream)
    if floor is None:
        return shifted(u * 1000).clamp(20.0, 980.0)
    lo = max(20.0, floor)
    unshift = [t / 1000 / (SHIFT - (SHIFT - 1) * t / 1000) for t in (lo, 980.0)]
    return shifted(1000 * (unshift[0] + u * (unshift[1] - unshift[0]))).clamp(lo, 980.0)


def phased_floor(k):
    """phased_scores: step k's output is scored at or above step k+1's shifted timestep; the last step's unfloored."""
    return float(shifted(torch.tensor(float(STEPS_RAW[k + 1])))) if k + 1 < len(STEPS_RAW) else None


@pytest.fixture(params=[False, True], ids=["plain", "phased"])
def phased(request, runtime):
    runtime.method.config.phased_scores = request.param
    yield request.param
    runtime.method.config.phased_scores = False


def early_step(stream, start):
    """An iteration whose shared exit index is not the last step (where phased_scores changes something)."""
    return next(s for s in range(start, start + 400, 2) if rng.shared_randint(4, 0, stream, s) < len(STEPS_RAW) - 1)


def test_generator_gradient_matches_independent_computation(runtime, three_wans, phased):
    m, a = runtime.method, runtime.adapter
    raw = next(runtime.loader)
    b = a.prepare_batch(raw, latents_source="zeros")
    step = early_step("rollout_noise", 2) if phased else 2
    loss = m.generator_loss(b, step)
    a.backward(m.student, loss)
    got = full_grads(m.student.module)
    m.student.engine.optimizer.zero_grad()

    student, critic, teacher = (plain(three_wans[r]) for r in ("student", "critic", "teacher"))
    ids, shape, cond = b.sample_ids, b.latent_shape, b.cond.float()
    k = rng.shared_randint(4, 0, "rollout_noise", step)
    x0_gen = reference_sample(student, ids, shape, cond, k, "rollout_noise", grad=True)
    with torch.no_grad():
        t = score_t(ids, "score_timestep", phased_floor(k) if phased else None)
        if phased:
            assert bool((t >= phased_floor(k) - 1e-3).all())
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        eps = rng.per_sample_randn(shape, ids, 0, "score_noise")
        x_t = (1 - s) * x0_gen + s * eps
        fake = x_t - s * model_v(critic, x_t, t, cond)
        real_c = x_t - s * model_v(teacher, x_t, t, cond)
        real_u = x_t - s * model_v(teacher, x_t, t, b.uncond.float())
        real = real_c + W * (real_c - real_u)
        g = (fake - real) / (x0_gen - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    ref_loss = 0.5 * torch.nn.functional.mse_loss(x0_gen, (x0_gen - g).detach())
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(v.abs().max()) > 0 for v in got.values())


@pytest.fixture(params=[False, True], ids=["random_exit", "final"])
def critic_final(request, runtime):
    runtime.method.config.critic_rollout = "final" if request.param else "random_exit"
    yield request.param
    runtime.method.config.critic_rollout = "random_exit"


def test_critic_loss_matches_independent_computation(runtime, three_wans, phased, critic_final):
    """The critic's flow-matching loss and gradient; `critic_rollout: final` on an iteration whose random exit is
    not the last step: the critic still learns the whole rollout's x0, over the whole range."""
    m, a = runtime.method, runtime.adapter
    raw = next(runtime.loader)
    b = a.prepare_batch(raw, latents_source="zeros")
    step = early_step("critic_rollout", 3) if phased or critic_final else 3
    loss = m.critic_loss(b, step)
    a.backward(m.critic, loss)
    got = full_grads(m.critic.module)
    m.critic.engine.optimizer.zero_grad()

    student, critic = plain(three_wans["student"]), plain(three_wans["critic"])
    ids, shape, cond = b.sample_ids, b.latent_shape, b.cond.float()
    k = len(STEPS_RAW) - 1 if critic_final else rng.shared_randint(4, 0, "critic_rollout", step)
    x0 = reference_sample(student, ids, shape, cond, k, "critic_rollout", grad=False)
    t = score_t(ids, "critic_timestep", phased_floor(k) if phased else None)
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    eps = rng.per_sample_randn(shape, ids, 0, "critic_noise")
    x_t = (1 - s) * x0 + s * eps
    ref = torch.nn.functional.mse_loss(model_v(critic, x_t, t, cond), eps - x0)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for n, p in critic.named_parameters():
        # fp32 summation order: the time embedder's gradient moves ~1e-4 of its largest element between the two
        # computations (1.9e-6 of 0.022 measured); a wrong rollout or timestep moves it by its own size
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=max(1e-6, 1e-4 * float(p.grad.abs().max())), msg=n)


def test_roles_step_on_schedule_and_teacher_never_changes(runtime):
    """interval 2: student frozen on odd iterations, stepped on even ones; critic every iteration;
    the teacher holds no optimizer and its weights never move."""
    m = runtime.method
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    # ZeRO-inference: only the parameter-fetch coordinator, no optimizer and no optimizer state.
    assert m.teacher.engine.basic_optimizer is None
    assert type(m.teacher.engine.optimizer) is DeepSpeedZeRoOffload
    assert not hasattr(m.teacher.engine.optimizer, "fp32_partitioned_groups_flat")
    assert all(not p.requires_grad for p in m.teacher.module.parameters())
    assert all(p.ds_tensor.numel() > 0 for p in m.teacher.module.parameters())  # partitioned by ZeRO-3
    teacher0 = full_weights(m.teacher.module)
    for step in (5, 6, 7):
        before_s, before_c = full_weights(m.student.module), full_weights(m.critic.module)
        scalars = m.train_one_step([next(runtime.loader)], step)
        after_s, after_c = full_weights(m.student.module), full_weights(m.critic.module)
        moved_s = any(not torch.equal(before_s[n], after_s[n]) for n in before_s)
        moved_c = any(not torch.equal(before_c[n], after_c[n]) for n in before_c)
        assert moved_s == (step % 2 == 0), step
        assert ("student/loss" in scalars) == (step % 2 == 0)
        assert moved_c and "critic/loss" in scalars
    teacher1 = full_weights(m.teacher.module)
    assert all(torch.equal(teacher0[n], teacher1[n]) for n in teacher0)


def test_guidance_zero_skips_unconditional_pass(runtime):
    """w = 0: two fewer teacher calls per generator step (conditional branch only)."""
    m = runtime.method
    calls = []
    hook = m.teacher.module.register_forward_hook(lambda *args: calls.append(1))
    try:
        b = m.adapter.prepare_batch(next(runtime.loader), latents_source="zeros")
        x0 = torch.zeros(b.batch_size, *b.latent_shape)
        m.dmd_target(x0, b)
        with_uncond = len(calls)
        calls.clear()
        old, m.config.real_score_guidance_scale = m.config.real_score_guidance_scale, 0.0
        m.dmd_target(x0, b)
        m.config.real_score_guidance_scale = old
    finally:
        hook.remove()
    assert (with_uncond, len(calls)) == (2, 1)


def test_phased_scores_floor_every_step_but_the_last(runtime):
    """phased_scores: for each exit k the score and critic timesteps are the shifted distribution above step k+1's
    timestep (the last step's: the whole [min, max] range, as with phased_scores off)."""
    m = runtime.method
    b = m.adapter.prepare_batch(next(runtime.loader), latents_source="zeros")
    seen = set()
    m.config.phased_scores = True
    try:
        for step in range(40):
            for rollout, stream in (("rollout_noise", "score_timestep"), ("critic_rollout", "critic_timestep")):
                k = m.exit_index(rollout, step)
                seen.add(k)
                got = m.score_timesteps(b, stream, m.score_floor(k))
                if k == len(STEPS_RAW) - 1:
                    assert m.score_floor(k) is None
                    torch.testing.assert_close(got, score_t(b.sample_ids, stream), rtol=1e-6, atol=1e-4)
                else:
                    floor = phased_floor(k)
                    assert m.score_floor(k) == pytest.approx(floor, abs=1e-3)
                    torch.testing.assert_close(got, score_t(b.sample_ids, stream, floor), rtol=1e-6, atol=1e-3)
                    assert bool((got >= floor - 1e-3).all() and (got <= 980.0).all())
    finally:
        m.config.phased_scores = False
    assert seen == set(range(len(STEPS_RAW)))
    assert m.score_floor(0) is None  # off: no floor anywhere


def test_exit_index_stops_early(runtime):
    """simulate: the rollout makes exactly k+1 student calls for the shared exit index k."""
    m = runtime.method
    b = m.adapter.prepare_batch(next(runtime.loader), latents_source="zeros")
    calls = []
    hook = m.student.module.register_forward_hook(lambda *args: calls.append(1))
    try:
        for step in range(8):
            calls.clear()
            with torch.no_grad():
                m.student_sample(b, step, with_grad=False, stream="critic_rollout")
            assert len(calls) == rng.shared_randint(4, 0, "critic_rollout", step) + 1
    finally:
        hook.remove()


def test_trailing_zero_ends_the_schedule(tiny_wan, toy_data, tmp_path):
    """FastVideo's lists end with 0 (the end of the schedule, not a step): it is dropped; a 0 elsewhere is refused."""
    from ds_distill.errors import RecipeError

    def checked(steps):
        recipe = dmd2_recipe(tiny_wan, toy_data, tmp_path / "out", method={"dmd_denoising_steps": steps})
        return check_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe))).method_config

    assert checked([999, 750, 500, 250, 0]).dmd_denoising_steps == [999, 750, 500, 250]
    assert checked([1000, 750, 500, 250]).dmd_denoising_steps == [1000, 750, 500, 250]
    for bad in ([0], [1000, 0, 0], [500, 0, 250]):
        with pytest.raises(RecipeError, match="method_config.dmd_denoising_steps"):
            checked(bad)
