"""The run engine both training loops stand on: the run folder, its lock, logs, checkpoints, resume,
stop signals, the config loader, seeding and one update step."""
