"""The --set pairs of the small, fast training the robustness tests share."""

TINY = [
    "n_layer=2",
    "n_embd=32",
    "n_head=2",
    "context_length=32",
    "batch_size=8",
    "eval_batches=2",
    "sample_tokens=0",
    "warmup_steps=5",
]
