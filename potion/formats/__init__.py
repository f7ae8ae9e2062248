"""What potion reads and writes on disk: run directories, atomic file writes, Hugging Face folders."""
