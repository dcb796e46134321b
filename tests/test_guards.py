"""Guards: each guard's math against a dense float64 reference (docs/guard.md)."""

from __future__ import annotations

import types

import pytest
import torch
from tests._tiny import VOCAB, random_batch, tiny_llama

from alignscope.curvature.fisher import FisherOperator
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.losses import AlignmentKL
from alignscope.data.encode import EncodedPair
from alignscope.params import select_params
from alignscope.train.guards import (
    AnchorGuard,
    ConstrainedSFTGuard,
    CurvatureGuard,
    FisherGuard,
    ProjectGuard,
    SafeLoRAGuard,
    TrackingGuard,
    make_guard,
    read_theta,
    write_theta,
)
from alignscope.train.guards.constrained import (
    constrained_weights,
    position_betas,
    response_index,
)
from alignscope.train.guards.penalties import fisher_diagonal
from alignscope.train.guards.projection import check_basis_memory
from alignscope.train.guards.safe_lora import project_b
from alignscope.train.loop import finetune

PARAMS = ["model.layers.1.mlp.*"]
TOKENIZER = types.SimpleNamespace(pad_token_id=0)


def _setup(seed: int = 0):
    model = tiny_llama(seed)
    selection = select_params(model, PARAMS)
    selection.train_only(model)
    safety = random_batch(6, seed=3)
    return model, selection, safety


def _dense_fisher(model, selection, batch, theta=None) -> torch.Tensor:
    op = FisherOperator(FunctionalLM(model, selection), batch, theta)
    return op.matmat(torch.eye(selection.size, dtype=torch.float64))


def _data(n: int = 12, seed: int = 5) -> list[EncodedPair]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (3 + i % 4,), generator=gen).tolist()
        out.append(EncodedPair(ids[:2], ids[2:]))
    return out


def _train(model, guard, steps: int = 6, weight_decay: float = 0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    return finetune(model, TOKENIZER, None, steps, batch_size=4, encoded=_data(),
                    optimizer=opt, guard=guard)  # fmt: skip


def _top(f: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(f)
    return vecs[:, -d:].flip(1), vals[-d:].flip(0)


def test_project_keeps_the_displacement_out_of_the_initial_subspace_under_adamw_decay():
    model, selection, safety = _setup()
    u, vals = _top(_dense_fisher(model, selection, safety), 3)
    theta0 = read_theta(model, selection)
    guard = ProjectGuard(rank=3)
    guard.setup(model, selection, safety, (u, vals))
    _train(model, guard)
    delta = read_theta(model, selection) - theta0
    assert float(delta.norm()) > 1e-2  # it trained
    assert float((u.T @ delta).abs().max()) < 1e-10
    assert guard.signals()["removed_fraction"] > 0

    unguarded, _, _ = _setup()  # the same run without the guard enters the subspace
    _train(unguarded, None)
    free = read_theta(unguarded, selection) - theta0
    assert float((u.T @ free).abs().max()) > 1e-4


def test_project_computes_its_subspace_at_theta0_when_none_is_given():
    model, selection, safety = _setup()
    u, _ = _top(_dense_fisher(model, selection, safety), 2)
    guard = ProjectGuard(rank=2)
    guard.setup(model, selection, safety)
    assert torch.allclose(guard.basis @ guard.basis.T, u @ u.T, atol=1e-8)


def test_tracking_basis_equals_a_fresh_eigensolve_at_the_current_weights():
    model, selection, safety = _setup()
    guard = TrackingGuard(rank=3, every=2, max_blocks=60, tol=1e-12)
    guard.setup(model, selection, safety)
    _train(model, guard, steps=5)
    assert guard.n_estimates == 2  # before updates 2 and 4
    theta = read_theta(model, selection)
    eig = guard.reestimate(model)
    u, vals = _top(_dense_fisher(model, selection, safety, theta), 3)
    assert eig.converged
    assert torch.allclose(eig.values, vals, rtol=1e-8)
    assert torch.allclose(guard.basis @ guard.basis.T, u @ u.T, atol=1e-7)
    assert 0 <= guard.rotation < 1
    resumed = TrackingGuard(rank=3, every=2)  # a resumed run: set up at theta0, state restored
    resumed.setup(tiny_llama(0).requires_grad_(True), selection, safety)
    resumed.load_state_dict(guard.state_dict())
    assert torch.equal(resumed.basis, guard.basis) and resumed.n_estimates == 3


def test_curvature_guard_gradient_is_mu_F_delta_and_the_cross_term_is_removed():
    model, selection, safety = _setup()
    f = _dense_fisher(model, selection, safety.select([0, 2, 3, 5]))  # 4 spread over 6
    guard = CurvatureGuard(mu=0.7, examples=4)
    guard.setup(model, selection, safety)
    theta0 = read_theta(model, selection)
    gen = torch.Generator().manual_seed(0)
    delta = 1e-2 * torch.randn(selection.size, generator=gen, dtype=torch.float64)
    write_theta(model, selection, theta0 + delta)
    guard.before_step(model, 0)
    grad = selection.flatten({n: p.grad for n, p in selection.tensors(model).items()})
    assert torch.allclose(grad, 0.7 * f @ delta, rtol=1e-10, atol=1e-14)
    assert guard.signals()["quad"] == pytest.approx(0.5 * float(delta @ f @ delta), rel=1e-10)

    w = f @ delta
    u = 1e-2 * torch.randn(selection.size, generator=gen, dtype=torch.float64)
    u = u + (1.0 - float(w @ u)) * w / float(w @ w)  # a step with a positive cross term (= 1)
    write_theta(model, selection, theta0 + delta + u)
    guard.after_step(model, 0)
    kept = read_theta(model, selection) - theta0 - delta
    assert guard.signals()["clipped"] and guard.signals()["cross"] == pytest.approx(1.0)
    assert torch.allclose(kept, u - w * float(w @ u) / float(w @ w), atol=1e-14)
    assert abs(float(w @ kept)) < 1e-12  # the quadratic model grows by u^T F u / 2 only


def _lora_model(init: bool = False, arch: str = "llama"):
    """A LoRA adapter on layer 1's two MLP matrices (a frozen prefix below, two weight shapes);
    GPT-2's Conv1D stores its weights transposed (PEFT's fan_in_fan_out)."""
    peft = pytest.importorskip("peft")
    if arch == "gpt2":
        from tests.test_arch_curvature import tiny_gpt2

        base, targets = tiny_gpt2(), ["c_fc", "c_proj"]
    else:
        base, targets = tiny_llama(0), ["up_proj", "down_proj"]
    config = peft.LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=init, target_modules=targets,
        layers_to_transform=[1], fan_in_fan_out=arch == "gpt2",
    )  # fmt: skip
    model = peft.get_peft_model(base, config)
    selection = select_params(model, "lora")
    selection.train_only(model)
    return model, selection


def _merged_change(model, theta, theta0, selection) -> torch.Tensor:
    """s (B A - B0 A0) of every adapted layer in its base weight's layout, flat (by hand)."""
    t, t0 = selection.unflatten(theta), selection.unflatten(theta0)
    out = []
    for name in selection.names:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        layer = model.get_submodule(name.split(".lora_A.")[0])
        s = layer.scaling["default"]
        d = s * (t[b_name] @ t[name] - t0[b_name] @ t0[name])
        out.append((d.T if layer.fan_in_fan_out else d).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_curvature_guard_on_lora_is_the_chain_rule_of_the_merged_weights_quadratic(arch):
    model, selection = _lora_model(arch=arch)
    safety = random_batch(6, seed=3)
    weights = select_params(
        model, [n.split(".lora_A.")[0] + ".base_layer.weight" for n in selection.names
                if ".lora_A." in n],
    )  # fmt: skip
    f_w = _dense_fisher(model, weights, safety.select([0, 2, 3, 5]))  # at theta0
    guard = CurvatureGuard(mu=0.7, examples=4)
    guard.setup(model, selection, safety)
    assert guard.settings()["space"] == "weights"
    theta0 = read_theta(model, selection)
    gen = torch.Generator().manual_seed(0)
    delta = 0.1 * torch.randn(selection.size, generator=gen, dtype=torch.float64)

    theta = (theta0 + delta).requires_grad_(True)
    dw = _merged_change(model, theta, theta0, selection)
    assert dw.numel() == weights.size
    q = 0.5 * dw @ f_w @ dw
    (grad_ref,) = torch.autograd.grad(q, theta)
    write_theta(model, selection, theta0 + delta)  # the factors train; F_W stays theta0's
    # the merged change is PEFT's own (its layout and scaling), not only the test's convention
    layers = [model.get_submodule(n.removesuffix(".base_layer.weight")) for n in weights.names]
    peft_dw = torch.cat([m.get_delta_weight("default").reshape(-1) for m in layers])
    assert torch.allclose(guard.lora.delta_w(theta0 + delta, from_start=False), peft_dw)
    guard.before_step(model, 0)
    grad = selection.flatten({n: p.grad for n, p in selection.tensors(model).items()})
    assert torch.allclose(grad, 0.7 * grad_ref, rtol=1e-10, atol=1e-14)
    assert guard.signals()["quad"] == pytest.approx(float(q.detach()), rel=1e-10)
    # the A directions count: B is not zero, so dQ/dA = s B^T G is not either
    a_part = torch.cat([g.reshape(-1) for n, g in selection.unflatten(grad).items()
                        if ".lora_A." in n])  # fmt: skip
    assert float(a_part.norm()) > 1e-3 * float(grad.norm())

    w = grad_ref.detach()
    u = 1e-2 * torch.randn(selection.size, generator=gen, dtype=torch.float64)
    u = u + (1.0 - float(w @ u)) * w / float(w @ w)  # a positive first-order cross term (= 1)
    write_theta(model, selection, theta0 + delta + u)
    guard.after_step(model, 0)
    kept = read_theta(model, selection) - theta0 - delta
    assert guard.signals()["clipped"] and guard.signals()["cross"] == pytest.approx(1.0)
    assert abs(float(w @ kept)) < 1e-12


def test_lora_adapter_fisher_at_peft_init_is_blind_to_A():
    """Why the guard works in weight space: with B0 = 0 the adapter's own Fisher at theta0 has
    no A directions, though A moves the merged weights as soon as B does."""
    model, selection = _lora_model(init=True)  # PEFT's default: B = 0
    safety = random_batch(6, seed=3)
    f = _dense_fisher(model, selection, safety)
    is_a = torch.cat([torch.full((n,), ".lora_A." in name) for name, n
                      in zip(selection.names, selection.numels, strict=True)])  # fmt: skip
    assert float(f[is_a].abs().max()) == 0.0 and float(f[~is_a].abs().max()) > 0
    guard = CurvatureGuard(mu=1.0, examples=6)
    guard.setup(model, selection, safety)
    theta0 = read_theta(model, selection)
    step = 0.1 * torch.randn(selection.size, generator=torch.Generator().manual_seed(2),
                             dtype=torch.float64)  # fmt: skip
    write_theta(model, selection, theta0 + step)
    guard.before_step(model, 0)
    grad = selection.flatten({n: p.grad for n, p in selection.tensors(model).items()})
    assert float(grad[is_a].norm()) > 0.01 * float(grad.norm())


def test_curvature_guard_space_follows_what_trains():
    # B alone trains: dW = s dB A0 is linear in it, the adapter's coordinates are exact
    model, _ = _lora_model()
    b_only = select_params(model, ["*lora_B*"])
    b_only.train_only(model)
    safety = random_batch(6, seed=3)
    guard = CurvatureGuard(examples=4)
    guard.setup(model, b_only, safety)
    assert guard.settings()["space"] == "params" and guard.lora is None
    with pytest.raises(ValueError, match="both factors"):
        CurvatureGuard(space="weights").setup(model, b_only, safety)
    # a trained adapter that does not enter the forward pass
    model, _ = _lora_model()
    model.add_adapter("other", model.peft_config["default"])
    both = select_params(model, ["*lora_*"])
    both.train_only(model)
    with pytest.raises(ValueError, match="not active"):
        CurvatureGuard(space="weights").setup(model, both, safety)
    # the weight space's vectors against the memory budget
    model, selection = _lora_model()
    with pytest.raises(MemoryError, match="--curvature-space params"):
        CurvatureGuard(memory_budget=1000).setup(model, selection, safety)


def test_fisher_diagonal_equals_the_dense_diagonal():
    model, selection, safety = _setup()
    f = _dense_fisher(model, selection, safety)
    op = FisherOperator(FunctionalLM(model, selection), safety)
    assert torch.allclose(fisher_diagonal(op, "exact", block=50), f.diagonal(), rtol=1e-10)
    mc = fisher_diagonal(op, "mc", samples=64)  # unbiased: E[R^T R] = F
    assert float(mc.sum()) == pytest.approx(float(f.trace()), rel=0.1)

    guard = FisherGuard(lam=3.0, method="exact")
    guard.setup(model, selection, safety)
    theta0 = read_theta(model, selection)
    delta = 1e-2 * torch.randn(selection.size, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)  # fmt: skip
    write_theta(model, selection, theta0 + delta)
    penalty = guard.extra_loss(model, 0)
    assert float(penalty.detach()) == pytest.approx(
        1.5 * float((f.diagonal() * delta**2).sum()), rel=1e-10
    )


def test_anchor_adds_beta_times_the_alignment_kl():
    model, selection, safety = _setup()
    guard = AnchorGuard(beta=2.0, batch_size=safety.size)
    guard.setup(model, selection, safety)
    kl = AlignmentKL(FunctionalLM(model, selection), safety)
    theta0 = read_theta(model, selection)
    assert float(guard.extra_loss(model, 0)) == pytest.approx(0.0, abs=1e-14)
    theta = theta0 + 0.1 * torch.randn(selection.size, generator=torch.Generator().manual_seed(2),
                                       dtype=torch.float64)  # fmt: skip
    write_theta(model, selection, theta)
    assert float(guard.extra_loss(model, 1)) == pytest.approx(2.0 * float(kl(theta)), rel=1e-10)


def test_constrained_sft_weights_at_known_log_ratios():
    betas = position_betas(8)
    assert betas.tolist() == pytest.approx([0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1])
    r = torch.tensor([0.0, 0.0, 3.0**0 * 0.0, -1.0])
    w = constrained_weights(r, torch.tensor([0.5, 2.0, 0.1, 2.0]))
    assert w.tolist()[:3] == pytest.approx([1.0, 1.0, 1.0])  # SFT's gradient at the reference
    assert float(w[3]) == pytest.approx(2 * (1 - 1 / (1 + torch.e**2)))
    # log(3) / beta: sigmoid = 3/4, weight 1/2, whatever the position's beta
    for beta in (0.5, 2.0, 0.1):
        rr = torch.tensor([float(torch.log(torch.tensor(3.0))) / beta])
        assert float(constrained_weights(rr, torch.tensor([beta]))) == pytest.approx(0.5)

    batch = random_batch(4, seed=2)
    index = response_index(batch)
    for b in range(batch.size):
        row = index[b][batch.target_mask[b]]
        assert row.tolist() == list(range(int(batch.target_mask[b].sum())))
    assert bool((index[~batch.target_mask] == -1).all())

    model, selection, _ = _setup()
    guard = ConstrainedSFTGuard()
    guard.setup(model, selection)
    logp = torch.zeros(index.shape, dtype=torch.float64)
    ref = torch.full(index.shape, -float(torch.log(torch.tensor(3.0))) / 2.0, dtype=torch.float64)
    w = guard.weights_from(batch, logp, ref)  # r = log(3)/2: weight 1/2 where beta = 2
    inner = (index >= 1) & (index <= 4)
    assert torch.allclose(w[inner], torch.full_like(w[inner], 0.5))
    assert bool((w[~batch.target_mask] == 0).all())


def test_constrained_sft_at_theta0_is_plain_sft():
    model, selection, _ = _setup()
    batch = random_batch(4, seed=4)
    guard = ConstrainedSFTGuard()
    guard.setup(model, selection)
    loss, task = guard.step_loss(model, batch, 0, "example")
    assert float(loss) == pytest.approx(float(task), rel=1e-12)  # every weight is 1 at r = 0


def test_safe_lora_projects_b_by_the_formula_and_leaves_layers_above_tau():
    gen = torch.Generator().manual_seed(0)
    w_aligned, w_base = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    a = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    v = w_aligned - w_base
    c = v @ v.T / v.norm()
    cos = float(((c @ b @ a) * (b @ a)).sum() / ((c @ b @ a).norm() * (b @ a).norm()))
    new_b, got_cos, projected = project_b(w_aligned, w_base, a, b, tau=cos + 1e-6)
    assert projected and got_cos == pytest.approx(cos, rel=1e-12)
    assert torch.allclose(new_b, c @ b, rtol=1e-12)
    same_b, _, projected = project_b(w_aligned, w_base, a, b, tau=cos - 1e-6)
    assert not projected and same_b is b


def test_safe_lora_on_a_peft_model():
    peft = pytest.importorskip("peft")
    base = tiny_llama(1)
    aligned = tiny_llama(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"], init_lora_weights=False)
    model = peft.get_peft_model(aligned, config)
    selection = select_params(model, "lora")
    guard = SafeLoRAGuard(base, tau=1.0)  # tau = 1: every layer is projected
    guard.setup(model, selection)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    b0, a = layer.lora_B["default"].weight.detach().clone(), layer.lora_A["default"].weight
    v = layer.base_layer.weight.detach() - base.model.layers[0].mlp.up_proj.weight.detach()
    record = guard.finalize(model)
    assert record["projected"] == 2
    assert torch.allclose(layer.lora_B["default"].weight, v @ v.T / v.norm() @ b0, rtol=1e-10)
    assert a.shape == (2, 8)


def test_prerequisites_are_clear_errors_before_training():
    model, selection, safety = _setup()
    with pytest.raises(ValueError, match="base model"):
        make_guard("safe-lora")
    with pytest.raises(ValueError, match="LoRA adapter"):
        SafeLoRAGuard(tiny_llama(1)).setup(model, selection)
    other = select_params(model, ["model.layers.0.mlp.*"])  # not trained: train_only(PARAMS)
    with pytest.raises(ValueError, match="not trained"):
        CurvatureGuard().setup(model, other, safety)
    with pytest.raises(MemoryError, match="subspace"):
        ProjectGuard(rank=20, memory_budget=1000).setup(model, selection, safety)
    with pytest.raises(MemoryError):
        check_basis_memory(10**9, 20, 4, 2**30, "x")
    with pytest.raises(ValueError, match="unknown guard"):
        make_guard("orthogonal")


def test_adaptive_mode_turns_the_guard_on_at_the_warning():
    from alignscope.train.guards import AdaptiveGuard

    model, selection, safety = _setup()
    u, vals = _top(_dense_fisher(model, selection, safety), 3)
    theta0 = read_theta(model, selection)
    watcher = types.SimpleNamespace(warnings=[])
    steps = []

    def callback(step, loss):  # the watcher warns after update 3
        steps.append(step)
        if step == 3:
            watcher.warnings.append({"step": 3})

    guard = AdaptiveGuard(ProjectGuard(rank=3), watcher)
    guard.setup(model, selection, safety, (u, vals))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    finetune(model, TOKENIZER, None, 3, batch_size=4, encoded=_data(), optimizer=opt,
             guard=guard, callback=callback)  # fmt: skip
    assert not guard.active and guard.signals() == {"active": False}
    before = u.T @ (read_theta(model, selection) - theta0)
    assert float(before.abs().max()) > 1e-4  # unguarded so far: it entered the subspace
    finetune(model, TOKENIZER, None, 6, batch_size=4, encoded=_data(), optimizer=opt,
             guard=guard, callback=callback, start_step=3)  # fmt: skip
    assert guard.active and guard.activated_at == 3 and guard.signals()["active"]
    after = u.T @ (read_theta(model, selection) - theta0)
    assert torch.allclose(after, before, atol=1e-10)  # from then on nothing enters it


def test_fisher_low_rank_penalty_and_gradient_against_the_dense_fisher():
    model, selection, safety = _setup()
    f = _dense_fisher(model, selection, safety)
    u, s = _top(f, 3)
    guard = FisherGuard(lam=0.7, method="exact", rank=3)
    guard.setup(model, selection, safety)
    theta0 = read_theta(model, selection)
    # the guard's F: U S U^T plus the diagonal of what it leaves, F - U S U^T
    low = u @ torch.diag(s) @ u.T
    approx = low + torch.diag((f - low).diagonal())
    assert torch.allclose(guard.basis @ guard.basis.T, u @ u.T, atol=1e-8)
    assert torch.allclose(approx.diagonal(), f.diagonal(), rtol=1e-10)  # the diagonal is F's
    gen = torch.Generator().manual_seed(1)
    delta = 1e-2 * torch.randn(selection.size, generator=gen, dtype=torch.float64)
    theta = (theta0 + delta).requires_grad_(True)
    penalty = guard.penalty(theta)
    assert torch.allclose(penalty, 0.35 * delta @ approx @ delta, rtol=1e-8)
    (grad,) = torch.autograd.grad(penalty, theta)
    want = 0.7 * approx @ delta
    assert torch.allclose(grad, want, rtol=1e-8, atol=1e-9 * float(want.abs().max()))
    # along the top eigenvector the low-rank term sees the eigenvalue, the diagonal alone not
    plain = FisherGuard(lam=0.7, method="exact")
    plain.setup(model, selection, safety)
    v = u[:, 0]
    top = float(guard.penalty(theta0 + v)) / 0.35
    assert top >= float(s[0]) - 1e-10 and top == pytest.approx(float(v @ approx @ v), rel=1e-8)
    assert float(plain.penalty(theta0 + v)) / 0.35 == pytest.approx(
        float(v @ torch.diag(f.diagonal()) @ v), rel=1e-8
    )


def test_tracking_reestimates_when_the_drift_signal_moves():
    model, selection, safety = _setup()
    theta0 = read_theta(model, selection)
    # one unguarded step: how far a step moves the weights, relative to |theta0|
    probe = tiny_llama(0)
    select_params(probe, PARAMS).train_only(probe)
    _train(probe, None, steps=1)
    step_move = float((read_theta(probe, selection) - theta0).norm() / theta0.norm())
    drift = 1.5 * step_move  # about every second step, never on the schedule (every = 0)
    guard = TrackingGuard(rank=3, every=0, drift=drift, max_blocks=6, tol=1e-10)
    guard.setup(model, selection, safety)
    thetas = {0: theta0}

    def callback(step, loss):  # the weights after `step` updates = before update `step`
        thetas[step] = read_theta(model, selection)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    finetune(model, TOKENIZER, None, 8, batch_size=4, encoded=_data(), optimizer=opt,
             guard=guard, callback=callback)  # fmt: skip
    expected, last = [], theta0
    for step in range(1, 8):  # the rule, recomputed from the recorded weights
        if float((thetas[step] - last).norm() / theta0.norm()) >= drift:
            expected.append(step)
            last = thetas[step]
    assert 2 <= len(expected) < 7  # the drift rule decided, not every step
    assert [e["step"] for e in guard.record()["reestimations"]] == expected
    assert all(e["reason"] == "drift" and e["moved"] >= drift for e in guard.estimates)
    assert guard.n_estimates == len(expected)
    # warm-started from the previous basis: the last estimate is the eigensolve at its weights
    u, _ = _top(_dense_fisher(model, selection, safety, thetas[expected[-1]]), 3)
    assert torch.allclose(guard.basis @ guard.basis.T, u @ u.T, atol=1e-6)
    resumed = TrackingGuard(rank=3, every=0, drift=drift)
    resumed.setup(tiny_llama(0).requires_grad_(True), selection, safety)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.record() == guard.record() and torch.equal(resumed.theta_last, last)
    with pytest.raises(ValueError, match="--track-drift"):
        TrackingGuard(rank=3, every=0)
