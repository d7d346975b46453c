"""TaskMoE: routing, sparse dispatch, capacity, auxiliary losses and expert statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl_vision.models.moe import TaskMoE


def _set_router(moe: TaskMoE, task: str, weight=None, bias=None) -> None:
    router = moe.routers[task]
    with torch.no_grad():
        router.weight.copy_(torch.zeros_like(router.weight) if weight is None else torch.as_tensor(weight))
        router.bias.copy_(torch.zeros_like(router.bias) if bias is None else torch.as_tensor(bias))


def _onehot_router(moe: TaskMoE, task: str, scale: float = 50.0) -> None:
    """Token features 0..E-1 decide the routing: a token with feature e set is sent to expert e first."""
    weight = torch.zeros(moe.num_experts, moe.dim)
    weight[:, : moe.num_experts] = scale * torch.eye(moe.num_experts)
    _set_router(moe, task, weight)


def _tokens_for(experts: list[int], dim: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose first `num_experts` features are a one-hot of the wanted expert, the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(experts), dim, generator=g)
    x[:, :num_experts] = F.one_hot(torch.tensor(experts), num_experts).float()
    return x


def _dense_reference(moe: TaskMoE, x: torch.Tensor, task: str) -> torch.Tensor:
    tokens = x.reshape(-1, moe.dim)
    gates = moe.route(tokens, task).dense_gates()  # (T, E)
    h = F.gelu(torch.einsum("td,edh->teh", tokens, moe.w1) + moe.b1)
    y = torch.einsum("teh,ehd->ted", h, moe.w2) + moe.b2
    return (gates.unsqueeze(-1) * y).sum(1).reshape(x.shape)


def test_gates_sum_to_one_and_k_distinct_experts():
    torch.manual_seed(0)
    moe = TaskMoE(16, 32, num_experts=8, top_k=3, tasks=["a", "b"], capacity_factor=None)
    x = torch.randn(50, 16)
    for task in ("a", "b"):
        r = moe.route(x, task)
        assert torch.allclose(r.gates.sum(-1), torch.ones(50), atol=1e-6)
        assert (r.gates > 0).all()
        assert r.experts.shape == (50, 3)
        assert all(len(set(row)) == 3 for row in r.experts.tolist())
        assert r.kept.all()
        assert torch.allclose(r.dense_gates().sum(-1), torch.ones(50), atol=1e-6)
        assert ((r.dense_gates() > 0).sum(-1) == 3).all()


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_output_matches_dense_reference(capacity_factor):
    torch.manual_seed(1)
    moe = TaskMoE(12, 20, num_experts=6, top_k=2, tasks=["seg", "depth"], capacity_factor=capacity_factor)
    x = torch.randn(2, 15, 12)
    for task in ("seg", "depth"):
        out = moe(x, task)
        assert out.shape == x.shape
        torch.testing.assert_close(out, _dense_reference(moe, x, task), atol=1e-5, rtol=1e-5)


def test_balance_loss_on_hand_built_routing():
    moe = TaskMoE(8, 16, num_experts=4, top_k=1, tasks=["a"], capacity_factor=None)
    _onehot_router(moe, "a", scale=2.0)  # soft enough that every expert has some probability
    experts = [0, 0, 0, 1, 2, 0]
    x = _tokens_for(experts, 8, 4)
    moe(x, "a")
    logits = x @ moe.routers["a"].weight.detach().t() + moe.routers["a"].bias.detach()
    probs = logits.softmax(-1)
    assert probs.argmax(-1).tolist() == experts
    f = torch.tensor([4, 1, 1, 0]) / 6.0
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(moe.last_balance_loss.detach(), expected)
    # two forwards are summed by the pop, which then clears
    moe(x, "a")
    torch.testing.assert_close(moe.pop_aux_loss().detach(), 2 * expected)
    assert moe.pop_aux_loss() is None


def test_balance_loss_is_one_for_uniform_and_num_experts_for_collapsed_routing():
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a"], capacity_factor=None)
    _set_router(moe, "a")  # all probabilities 1/4
    moe(torch.randn(10, 8), "a")
    torch.testing.assert_close(moe.last_balance_loss.detach(), torch.tensor(1.0))
    _set_router(moe, "a", bias=[100.0, 0, 0, 0])
    moe(torch.randn(10, 8), "a")  # all mass on expert 0, top-2 picks expert 0 and one other
    assert moe.last_balance_loss.item() == pytest.approx(4 * 0.5, abs=1e-4)


def test_expert_without_tokens_gets_zero_gradient():
    torch.manual_seed(2)
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a"], capacity_factor=None)
    _set_router(moe, "a", bias=[5.0, 4.0, 0.0, 0.0])  # every token goes to experts 0 and 1
    moe(torch.randn(3, 7, 8), "a").square().sum().backward()
    for p in (moe.w1, moe.b1, moe.w2, moe.b2):
        assert p.grad[2:].abs().sum() == 0
        assert p.grad[:2].abs().sum(dim=tuple(range(1, p.dim()))).gt(0).all()
    assert moe.experts_used("a") == [0, 1]


def test_expert_gradient_only_depends_on_its_tokens():
    moe = TaskMoE(8, 16, num_experts=4, top_k=1, tasks=["a"], capacity_factor=None)
    _onehot_router(moe, "a")
    experts = [0, 1, 2, 0, 3, 1]
    weight = torch.randn(len(experts), 8, generator=torch.Generator().manual_seed(3))

    def expert0_grads(x):
        moe.zero_grad(set_to_none=True)
        (moe(x, "a") * weight).sum().backward()
        return [p.grad[0].clone() for p in (moe.w1, moe.b1, moe.w2, moe.b2)]

    x = _tokens_for(experts, 8, 4)
    base = expert0_grads(x)
    other = x.clone()
    other[1, 4:] += 3.0  # token 1 goes to expert 1, its routing features are untouched
    other[4, 4:] -= 2.0
    for g, h in zip(base, expert0_grads(other)):
        assert torch.equal(g, h)
    mine = x.clone()
    mine[3, 4:] += 1.0  # token 3 goes to expert 0
    assert any(not torch.allclose(g, h) for g, h in zip(base, expert0_grads(mine)))


def test_capacity_drops_exactly_the_overflow():
    moe = TaskMoE(8, 16, num_experts=4, top_k=1, tasks=["a"], capacity_factor=1.0)
    _onehot_router(moe, "a")
    experts = [0, 0, 1, 0, 0, 1, 0, 1]  # 5 tokens for expert 0, 3 for expert 1; capacity ceil(8/4) = 2
    x = _tokens_for(experts, 8, 4)
    assert moe.capacity(8) == 2
    r = moe.route(x, "a")
    assert r.kept.squeeze(1).tolist() == [True, True, True, False, False, True, False, False]
    out = moe(x, "a")
    dropped = ~r.kept.squeeze(1)
    assert out[dropped].abs().sum() == 0
    assert out[~dropped].abs().sum(-1).gt(0).all()
    torch.testing.assert_close(out, _dense_reference(moe, x, "a"), atol=1e-5, rtol=1e-5)
    stats = moe.expert_stats()
    assert stats["dropped_share"] == pytest.approx(4 / 8)
    assert stats["dropped_share/a"] == pytest.approx(4 / 8)


def test_capacity_prefers_first_choices():
    moe = TaskMoE(4, 8, num_experts=2, top_k=2, tasks=["a"], capacity_factor=0.75)
    _onehot_router(moe, "a", scale=5.0)
    x = _tokens_for([1, 1, 0, 0], 4, 2)  # tokens 0, 1 prefer expert 1, tokens 2, 3 prefer expert 0
    assert moe.capacity(4) == 3
    r = moe.route(x, "a")
    assert r.experts.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    # each expert: both first choices kept, then second choices in token order until full (one fits)
    assert r.kept.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    out = moe(x, "a")
    torch.testing.assert_close(out, _dense_reference(moe, x, "a"), atol=1e-5, rtol=1e-5)


def test_expert_stats():
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a", "b", "c"], capacity_factor=None)
    _set_router(moe, "a", bias=[5.0, 4.0, 0.0, 0.0])
    _set_router(moe, "b", bias=[0.0, 0.0, 4.0, 5.0])
    _set_router(moe, "c")  # uniform gate
    x = torch.randn(20, 8)
    moe(x, "a")
    moe(x, "b")
    stats = moe.expert_stats()
    for task in ("a", "b"):
        assert sum(stats[f"usage/{task}/{e}"] for e in range(4)) == pytest.approx(1.0)
        assert stats[f"dead_share/{task}"] == pytest.approx(0.5)
    assert stats["usage/a/0"] == pytest.approx(0.5) and stats["usage/a/2"] == 0.0
    assert stats["dead_share"] == 0.0
    assert stats["dropped_share"] == 0.0
    assert "usage/c/0" not in stats  # task c not called yet
    assert moe.experts_used("a") == [0, 1] and moe.experts_used("b") == [2, 3]

    moe.reset_expert_stats()
    assert moe.expert_stats() == {} and moe.experts_used("a") == []
    moe(x, "c")
    stats = moe.expert_stats()
    assert stats["gate_entropy/c"] == pytest.approx(math.log(4), rel=1e-5)
    moe.reset_expert_stats()
    moe(x, "a")
    assert stats["gate_entropy/c"] > moe.expert_stats()["gate_entropy/a"]
    assert moe.expert_stats()["dead_share"] == pytest.approx(0.5)


def _mi_term(bias_a, bias_b) -> tuple[torch.Tensor, TaskMoE]:
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a", "b"], capacity_factor=None, mi_loss_weight=1.0)
    _set_router(moe, "a", bias=bias_a)
    _set_router(moe, "b", bias=bias_b)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(4))
    moe(x, "a")
    balance = moe.last_balance_loss
    moe(x, "b")
    balance = balance + moe.last_balance_loss
    total = moe.pop_aux_loss()
    return total - balance, moe


def test_mutual_information_loss():
    uniform, _ = _mi_term([0.0] * 4, [0.0] * 4)
    specialised, moe = _mi_term([3.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0])
    assert torch.isfinite(specialised) and torch.isfinite(uniform)
    assert uniform.item() == pytest.approx(0.0, abs=1e-6)
    assert specialised.item() < uniform.item() - 0.1
    specialised.backward()
    for task in ("a", "b"):
        grad = moe.routers[task].bias.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # fully one-hot routing stays finite
    cond = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = TaskMoE.mutual_information_loss(cond)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(2), abs=1e-6)
    assert torch.isfinite(cond.grad).all()


def test_no_loss_queued_without_grad_and_router_noise_only_in_training():
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a"], router_noise=1.0)
    x = torch.randn(30, 8)
    with torch.no_grad():
        moe(x, "a")
    assert moe.last_balance_loss is not None and moe.pop_aux_loss() is None
    moe.eval()
    torch.testing.assert_close(moe(x, "a"), moe(x, "a"))
    moe.train()
    assert not torch.equal(moe.route(x, "a").probs, moe.route(x, "a").probs)
    with pytest.raises(KeyError):
        moe(x, "unknown")


def test_bf16_autocast_and_empty_input():
    torch.manual_seed(5)
    moe = TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a"])
    x = torch.randn(2, 9, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, "a")
    assert out.dtype == x.dtype
    (out.float().sum() + moe.pop_aux_loss()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(moe.w1.grad).all()
    empty = moe(torch.zeros(0, 8), "a")
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("dispatch", ["fixed", "grouped"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
def test_both_dispatches_match_the_dense_reference_with_gradients(dispatch, capacity_factor):
    if dispatch == "fixed" and capacity_factor is None:
        with pytest.raises(ValueError, match="capacity_factor"):
            TaskMoE(8, 16, num_experts=4, top_k=2, tasks=["a"], capacity_factor=None, dispatch="fixed")
        return
    torch.manual_seed(6)
    moe = TaskMoE(12, 20, num_experts=6, top_k=2, tasks=["a"], capacity_factor=capacity_factor, dispatch=dispatch)
    x = torch.randn(3, 11, 12)
    weight = torch.randn(3, 11, 12)
    grads = []
    for fn in (lambda x: moe(x, "a"), lambda x: _dense_reference(moe, x, "a")):
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        (out * weight).sum().backward()
        grads.append([out.detach(), xx.grad, *(p.grad for p in (moe.w1, moe.b1, moe.w2, moe.b2))])
    moe.pop_aux_loss()
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["fixed", "grouped"])
@pytest.mark.parametrize("capacity_factor", [None, 0.4, 1.25])
def test_stacked_tasks_equal_one_call_per_task(dispatch, capacity_factor):
    """`moe(x, tasks)` on the tasks' chunks stacked along the first dimension is one call per task:
    outputs, gradients, one balancing loss per task, the MI loss and the statistics."""
    if dispatch == "fixed" and capacity_factor is None:
        dispatch = "auto"
    tasks = ["a", "b", "c"]
    torch.manual_seed(7)
    moe = TaskMoE(16, 24, 4, 2, tasks, capacity_factor=capacity_factor, mi_loss_weight=0.5, dispatch=dispatch)
    x = torch.randn(3 * 2, 7, 16)
    weight = torch.randn_like(x)
    results = []
    for stacked in (True, False):
        moe.zero_grad(set_to_none=True)
        moe.reset_expert_stats()
        xx = x.clone().requires_grad_(True)
        out = moe(xx, tasks) if stacked else torch.cat([moe(c, t) for c, t in zip(xx.chunk(3), tasks)])
        balance = torch.stack(moe._pending_losses).detach()
        aux = moe.pop_aux_loss()
        ((out * weight).sum() + aux).backward()
        results.append((out.detach(), xx.grad, *(p.grad for p in moe.parameters()), balance, aux.detach()))
        results[-1] += (moe.expert_stats(),)
    got, want = results
    assert got[-2].shape == () and got[-3].shape == (3,)
    for a, b in zip(got[:-1], want[:-1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[-1].keys() == want[-1].keys()
    for key in want[-1]:
        assert got[-1][key] == pytest.approx(want[-1][key], abs=1e-9), key
    with pytest.raises(ValueError, match="equal chunks"):
        moe(torch.randn(4, 16), tasks)


def test_forward_never_reads_tensor_values_on_the_host(monkeypatch):
    """No `.item()`, `.tolist()`, `nonzero()`, `bool(tensor)`, `int(tensor)` or `torch.bincount` in a
    forward + backward (on CUDA each would wait for the device)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    moes = [
        TaskMoE(8, 16, 4, 2, ["a", "b"], capacity_factor=cf, mi_loss_weight=0.1, router_noise=0.1, dispatch=d)
        for cf, d in ((1.25, "fixed"), (1.25, "grouped"), (None, "grouped"))
    ]
    x = torch.randn(4, 5, 8, requires_grad=True)
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("nonzero", "bincount", "unique", "argwhere", "masked_select"):
        monkeypatch.setattr(torch, name, refuse)
    for moe in moes:
        out = moe(x, ("a", "b")) + moe(x, "a")
        (out.square().sum() + moe.pop_aux_loss()).backward()
    monkeypatch.undo()
    assert all(moe.expert_stats()["dead_share/a"] >= 0 for moe in moes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dispatch", ["fixed", "grouped"])
def test_no_device_sync_on_cuda(dispatch):
    moe = TaskMoE(64, 128, 8, 2, ["a", "b"], capacity_factor=1.25, mi_loss_weight=0.1, dispatch=dispatch).cuda()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    moe(x, ("a", "b"))  # warm-up outside the check (lazy CUDA initialisation)
    moe.pop_aux_loss()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dispatch == "grouped"):
            out = moe(x, ("a", "b"))
        (out.float().square().sum() + moe.pop_aux_loss()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
