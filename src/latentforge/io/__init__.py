"""Reading and writing the files users bring: single-file checkpoints, diffusers folders, images."""
