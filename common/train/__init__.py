"""The training loop (trainer.py), run folders and checkpoints, epochs, guards, the entry points' process setup."""
