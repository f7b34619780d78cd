"""Models: loading (pretrained or from scratch), tokenizers, quantization and inspection."""
