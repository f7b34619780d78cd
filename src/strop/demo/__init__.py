"""`strop demo`: a synthetic world, a tiny model pretrained on it, and three fine-tunes."""
