"""The feed-forward step's non-linearities: GELU (tanh form), relu², and the gated SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ReluSquared(torch.autograd.Function):
    """relu(h)², with a backward pass of two elementwise passes where autograd's chain of relu and product takes
    four."""

    @staticmethod
    def forward(ctx, h):
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2)  # d(r²)/dh = 2r, and 0 where h < 0 because r is 0 there


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    return ReluSquared.apply(h)


def relu_squared_reference(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation. When compiled, written with a sigmoid (gelu_by_sigmoid): the compiler
    fuses that into one pass, and a CPU's tanh costs several times its exp."""
    if torch.compiler.is_compiling():
        return gelu_by_sigmoid(h)
    return F.gelu(h, approximate="tanh")


def gelu_by_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """h (1 + tanh z) / 2 = h sigmoid(2 z), where z = sqrt(2 / pi) (h + 0.044715 h^3): the same function."""
    return h * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h))


def gelu_reference(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated feed-forward of Llama-family models: silu(gate) * up, where silu(g) = g * sigmoid(g)."""
    return F.silu(gate) * up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate * torch.sigmoid(gate) * up
