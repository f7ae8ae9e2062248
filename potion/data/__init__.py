"""Text in: built-in corpora, tokenizers, and documents turned into token files and batches."""
