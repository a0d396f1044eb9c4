"""The pretraining loop shared by every SSL method: data, schedules, EMA, AMP, DDP, checkpoints, logs."""
