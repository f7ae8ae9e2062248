import pytest
import torch

from potion.config import ModelConfig, TrainConfig
from potion.model import GPT
from potion.train import optim


def test_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(learning_rate=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    rates = [optim.learning_rate_at(s, tc) for s in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[100] == pytest.approx(1e-4)


def test_wsd_schedule_is_flat_then_decays_linearly():
    tc = TrainConfig(
        learning_rate=1e-3, warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0
    )
    assert optim.learning_rate_at(50, tc) == optim.learning_rate_at(79, tc) == pytest.approx(1e-3)
    assert optim.learning_rate_at(90, tc) == pytest.approx(5e-4)
    assert optim.learning_rate_at(100, tc) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, n_embd=8))
    decay, no_decay = optim.parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_orthogonalise_pushes_singular_values_towards_one():
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 5
    singular = torch.linalg.svdvals(optim.orthogonalise(g))
    assert singular.min() > 0.5 and singular.max() < 1.5


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_muon_takes_the_hidden_matrices_and_uses_bf16_only_where_it_is_fast(monkeypatch, fast_bf16):
    monkeypatch.setattr(optim, "cpu_has_fast_bf16", lambda: fast_bf16)
    model = GPT(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, n_embd=8))
    adamw, muon = optim.make_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(muon, optim.Muon)
    assert muon.orthogonalise_dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in optim.hidden_matrices(model)}
    assert not muon_ids & {id(p) for g in adamw.param_groups for p in g["params"]}
    _, asked_fp32 = optim.make_optimizer(model, TrainConfig(optimizer="muon", dtype="fp32"), "cpu")
    assert asked_fp32.orthogonalise_dtype == torch.float32


@pytest.mark.parametrize("flag_on_the_host", [True, False])  # False: as on a GPU, masked without reading it
def test_a_step_marked_found_inf_changes_no_weight_and_no_optimizer_state(monkeypatch, flag_on_the_host):
    monkeypatch.setattr(optim, "read_for_free", lambda flag: flag_on_the_host)
    model = GPT(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, n_embd=8))
    optimizers = optim.make_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert optim.can_skip_on_device(optimizers)
    found_inf = torch.zeros(())
    for opt in optimizers:
        opt.found_inf = found_inf

    def step(grad_value=None):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if grad_value is None else torch.full_like(p, grad_value)
        for opt in optimizers:
            opt.step()

    def snapshot():
        return [t.clone() for t in model.state_dict().values()] + [
            t.clone() for opt in optimizers for s in opt.state.values() for t in s.values()
        ]

    step()
    before = snapshot()
    found_inf.fill_(1.0)
    step(float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    found_inf.fill_(0.0)
    step()
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))


def test_our_muon_lowers_a_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16))
    target = torch.randn(16, 16)
    opt = optim.Muon([w], lr=0.05)
    start = float(((w.detach() - target) ** 2).mean())
    for _ in range(50):
        loss = ((w - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(((w.detach() - target) ** 2).mean()) < 0.5 * start


def test_orthogonalising_a_stack_equals_one_matrix_at_a_time():
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 16, 16), (2, 32, 8), (2, 8, 32)]:
        stack = torch.randn(*shape, generator=gen)
        one_by_one = torch.stack([optim.orthogonalise(g) for g in stack])
        torch.testing.assert_close(optim.orthogonalise(stack), one_by_one, rtol=1e-5, atol=1e-6)


def test_stacks_that_are_each_others_transposes_are_orthogonalised_together_as_on_their_own():
    gen = torch.Generator().manual_seed(1)
    stacks = {torch.Size(s): torch.randn(3, *s, generator=gen) for s in [(32, 8), (8, 32), (16, 16)]}
    together = optim.orthogonalise_stacks(stacks, torch.float32)
    assert set(together) == set(stacks)
    for shape, stack in stacks.items():
        assert together[shape].shape == stack.shape
        torch.testing.assert_close(together[shape], optim.orthogonalise(stack), rtol=1e-5, atol=1e-6)


def test_fused_adamw_is_found_where_torch_has_the_kernel():
    assert optim.has_fused_adamw("cpu")  # torch >= 2.4 has a fused CPU kernel; potion asks for torch >= 2.5
    assert not optim.has_fused_adamw("meta")  # a device with no kernel (and no data) is refused, not an error
