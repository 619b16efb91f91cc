"""Key tables between latentforge's module names and the other layouts checkpoints come in."""
