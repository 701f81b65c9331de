"""Training: the Trainer, batch sources, replay buffer, augmentation, schedule, checkpoints."""
