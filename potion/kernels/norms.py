"""RMSNorm: x / rms(x) * gain over the last dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm computed in fp32 and returned in x's dtype, with a hand-written backward pass: on a CPU, autograd's
    own backward of rms_norm is a chain of a dozen small operations and sums the gain's gradient in bf16; this one
    takes fewer passes and sums in fp32."""

    @staticmethod
    def forward(ctx, x, gain, eps):
        # x times an fp32 tensor is an fp32 tensor: each product below reads x once, with no separate copy
        precision = torch.promote_types(x.dtype, torch.float32)
        squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=precision).square_()
        rstd = squares.div_(x.size(-1)).add_(eps).rsqrt_()  # (..., 1): 1 / rms(x)
        ctx.save_for_backward(x, gain, rstd)
        return torch.mul(x * rstd, gain, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad):
        x, gain, rstd = ctx.saved_tensors
        normed = x * rstd  # x / rms(x), fp32
        grad_gain = (grad * normed).sum(tuple(range(x.dim() - 1)))
        grad_normed = grad * gain
        # d(normed)/dx projects out the component along normed, then scales by 1 / rms
        along = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.mul(grad_normed.sub_(normed.mul_(along)), rstd, out=torch.empty_like(x))
        return grad_x, grad_gain, None


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return RMSNormFunction.apply(x, gain, eps)
    # the gain in x's dtype: a bf16 input with an fp32 gain falls off the fused kernel
    return F.rms_norm(x, (x.size(-1),), gain.to(x.dtype), eps)


def rms_norm_reference(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * gain.float()).to(x.dtype)
