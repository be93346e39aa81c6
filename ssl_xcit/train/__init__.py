"""DINO training: typed config, the step, the epoch loop, checkpoints, logging."""
