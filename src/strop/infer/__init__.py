"""Use a trained model: load it, generate, chat, evaluate."""
