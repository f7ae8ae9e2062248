"""Optimizers, the learning-rate schedule, and steps dropped on the device when they are not finite.

Weight decay is decoupled (AdamW) and applies to matrices only: embeddings and linear weights, never biases or
norm gains. The schedule is a pure function of the step, so a resumed run picks it up exactly.
"""

from __future__ import annotations

import functools
import math

import torch

from potion.config import TrainConfig
from potion.hardware import cpu_has_fast_bf16
from potion.parallel.sharded import local, stacked_parts, stacked_whole


def learning_rate_at(step: int, config: TrainConfig, peak: float | None = None) -> float:
    """Linear warmup, then cosine decay (or a flat stretch and a linear decay: wsd) down to a floor."""
    peak = config.learning_rate if peak is None else peak
    floor = peak * config.min_lr_ratio
    total = max(config.max_steps, 1)
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        decay_start = total - int(config.decay_fraction * total)
        if step < decay_start:
            return peak
        progress = min((step - decay_start) / max(total - decay_start, 1), 1.0)
        return peak + (floor - peak) * progress
    progress = min((step - config.warmup_steps) / max(total - config.warmup_steps, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (2-D and up) decay; vectors (biases, norm gains) do not. Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a tied matrix only once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
    ]


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 2-D weights inside the blocks (query, key, value, projections, MLP): the ones Muon orthogonalises.

    Embeddings and the output head are lookups/readouts rather than maps between hidden states, so they stay
    with AdamW, as do all vectors.
    """
    blocks = getattr(model, "blocks", None)
    return [p for p in blocks.parameters() if p.dim() == 2 and p.requires_grad] if blocks is not None else []


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """A list of optimizers stepped together (one for AdamW; Muon adds a second for the hidden matrices, and is the
    only one where those are all that trains, as with LoRA adapters)."""
    muon_params = hidden_matrices(model) if config.optimizer == "muon" else []
    muon_ids = {id(p) for p in muon_params}
    groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
        for g in parameter_groups(model, config.weight_decay)
    ]
    groups = [g for g in groups if g["params"]]  # none with LoRA and Muon: every adapter is a hidden matrix
    for g in groups:
        g["peak_lr"] = config.learning_rate
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        betas, fused = (config.beta1, config.beta2), has_fused_adamw(device_type) or None
        optimizers.append(torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=fused))
    if muon_params:
        # bf16 Newton-Schulz where bf16 is fast (on CPUs without bf16 hardware it would be hundreds of times
        # slower), unless the run asks for fp32: then every step is in fp32
        fast_bf16 = device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16())
        fast_bf16 = fast_bf16 and config.dtype != "fp32"
        muon = Muon(
            muon_params,
            lr=config.muon_lr,
            weight_decay=config.weight_decay,
            momentum=0.95,
            orthogonalise_dtype=torch.bfloat16 if fast_bf16 else torch.float32,
        )
        for g in muon.param_groups:
            g["peak_lr"] = config.muon_lr
        optimizers.append(muon)
    return optimizers


@functools.lru_cache(maxsize=None)
def has_fused_adamw(device_type: str) -> bool:
    """The fused AdamW kernel: one pass over the parameters, and it can drop a step on the device (found_inf).

    torch lists the devices that have the kernel only in a private function, so this asks by taking one step on
    a one-number parameter: torch refuses fused=True (in the step, or in older versions the constructor) where
    the kernel is missing.
    """
    try:
        p = torch.zeros(1, device=device_type, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError, AssertionError):  # AssertionError: a torch built without this device
        return False
    return True


def can_skip_on_device(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether every optimizer honours `found_inf` (a 0/1 tensor: 1 drops the step), so that a non-finite step can
    be dropped without reading anything back to the host."""
    return all(isinstance(opt, Muon) or opt.defaults.get("fused") for opt in optimizers)


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately replace each matrix in g (shape (..., m, n)) by the nearest semi-orthogonal one (U V^T of its
    SVD) by Newton-Schulz steps. Matrices of one shape go through together: one batched product instead of many
    small ones, which is what makes Muon cheap next to a small model's forward and backward pass."""
    a, b, c = 3.4445, -4.7750, 2.0315  # a quintic tuned to push singular values towards 1 fast
    shape = g.shape
    x = g.reshape(-1, *shape[-2:])
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # work on the wide orientation, so the Gram matrix is the smaller one
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return (x.mT if transposed else x).reshape(shape)


def state_slots(optimizer: torch.optim.Optimizer) -> set[str]:
    """The state an optimizer keeps for each parameter once it has stepped: what a checkpoint must hold for it."""
    if isinstance(optimizer, Muon):
        return {"momentum_buffer"}
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())


def read_for_free(flag: torch.Tensor) -> bool:
    """Whether reading a tensor's value on the host costs no wait (it is on the CPU, not a GPU's queue)."""
    return flag.device.type == "cpu"


class Muon(torch.optim.Optimizer):
    """Momentum, then an orthogonalised update. potion's own rather than torch.optim.Muon: it orthogonalises all
    matrices of one shape in one batched product, and like fused AdamW it honours `found_inf`, so a step with a
    NaN or inf gradient is dropped on the device without a host sync."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        orthogonalise_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.orthogonalise_dtype = orthogonalise_dtype

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)  # a 0/1 tensor set by the training loop, as for fused AdamW
        if found_inf is not None and read_for_free(found_inf):
            if bool(found_inf):
                return  # a dropped step changes nothing
            found_inf = None  # plain numbers below: no masking (a tenth of tiny's Muon step, measured)
        keep = 1.0 if found_inf is None else 1.0 - found_inf  # 0 turns every update below into "stay as you are"
        applied = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            same_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    same_shape.setdefault(p.shape, []).append(p)
            nesterov = {}
            for shape, params in same_shape.items():
                # With FSDP each process holds a part of each matrix (its rows): the momentum is kept in parts,
                # and the matrices are gathered whole to be orthogonalised (see README: Muon on several processes)
                grads = [local(p.grad) for p in params]
                if applied is not None:  # a dropped step's NaNs must not reach the momentum
                    grads = [torch.where(applied, g, 0.0) for g in grads]
                bufs = [local(self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))) for p in params]
                torch._foreach_mul_(bufs, 1.0 + (group["momentum"] - 1.0) * keep)  # a dropped step keeps them
                torch._foreach_add_(bufs, grads)
                nesterov[shape] = stacked_whole(torch._foreach_add(grads, bufs, alpha=group["momentum"]), params)
            orthogonal = orthogonalise_stacks(nesterov, self.orthogonalise_dtype)
            for shape, params in same_shape.items():
                updates = stacked_parts(orthogonal[shape].to(params[0].dtype), params)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                parts = [local(p) for p in params]
                torch._foreach_mul_(parts, 1.0 - group["lr"] * group["weight_decay"] * keep)
                torch._foreach_mul_(updates, -group["lr"] * scale * keep)
                torch._foreach_add_(parts, updates)


def orthogonalise_stacks(stacks: dict[torch.Size, torch.Tensor], dtype: torch.dtype) -> dict[torch.Size, torch.Tensor]:
    """Each stack of matrices (k, m, n) orthogonalised in dtype. Shapes that are each other's transposes (an MLP's
    widening and narrowing matrices) go through in one batch, the tall ones transposed: half the calls."""
    together: dict[tuple, list[torch.Size]] = {}
    for shape in stacks:
        together.setdefault((min(shape), max(shape)), []).append(shape)
    done = {}
    for shapes in together.values():
        wide = [stacks[s].mT if s[0] > s[1] else stacks[s] for s in shapes]  # (k, short side, long side)
        batch = orthogonalise(torch.cat([w.to(dtype) for w in wide]))
        for s, part in zip(shapes, batch.split([len(w) for w in wide])):
            done[s] = part.mT if s[0] > s[1] else part
    return done


def set_learning_rate(optimizers: list[torch.optim.Optimizer], step: int, config: TrainConfig) -> float:
    """Each group follows the schedule scaled to its own peak; returns the AdamW rate for the log."""
    first = None
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(step, config, g["peak_lr"])
            first = g["lr"] if first is None else first
    return first


class StepTally:
    """What the training steps did, tallied on the device so that a step needs no host sync: the summed loss of the
    finite steps and the count of non-finite ones (a NaN or inf loss or gradient norm), whose optimizer steps are
    dropped on the device too (the optimizers' `found_inf`). The loop reads the counts back only now and then.
    Optimizers that cannot drop a step on the device are skipped from the host instead."""

    def __init__(
        self, device: torch.device, optimizers: list, total: int = 0, since_last_row: int = 0, loss_sum: float = 0.0
    ):
        self.optimizers, self.on_device = optimizers, can_skip_on_device(optimizers)
        self.dropped = torch.zeros((), device=device)  # 1.0 while the current step is being dropped
        self.loss_sum = torch.tensor(loss_sum, device=device)
        counts = (0, since_last_row, total)
        self.in_a_row, self.since_last_row, self.total = (torch.tensor(float(n), device=device) for n in counts)
        if self.on_device:
            for opt in optimizers:
                opt.found_inf = self.dropped

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Apply the optimizers unless the loss or gradient norm is not finite, and count."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.dropped.copy_(~finite)
        if self.on_device or bool(finite):  # bool(): a host sync, only for optimizers without found_inf
            for opt in self.optimizers:
                opt.step()
        self.in_a_row.mul_(self.dropped).add_(self.dropped)
        self.since_last_row.add_(self.dropped)
        self.total.add_(self.dropped)
        self.loss_sum += torch.where(finite, loss, 0.0)

    def read(self) -> tuple[int, int, int]:
        """(in a row, since the last train row, in all): one host sync."""
        return tuple(int(n) for n in torch.stack([self.in_a_row, self.since_last_row, self.total]).tolist())

    def new_window(self) -> None:
        self.loss_sum.zero_()
        self.since_last_row.zero_()
