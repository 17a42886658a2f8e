"""Training: the trainer loop, optimizers and LR schedules, precision, metrics and loggers."""
