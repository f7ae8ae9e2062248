"""Several processes under torchrun: the process group, DDP / FSDP wrapping, gathered state."""
