"""Hugging Face interop: GPT-2 folders and model names in, transformers-loadable folders out."""
