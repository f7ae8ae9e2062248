"""The fast operations the model is built from, each beside the plain PyTorch computation it must equal.

attention.py: causal attention (fused kernels, blocks of queries with dropout, grouped-query heads);
norms.py: RMSNorm with its own backward pass; activations.py: GELU, relu², SwiGLU; dropout.py: dropout from
cheap random bits. tests/test_kernels.py checks each fast path against its reference. Why each fast path exists,
with its timings, is in docs/benchmarks.md ("Kernels").
"""
