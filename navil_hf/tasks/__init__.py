"""Tasks to train and measure NaViL models on: the synthetic shapes task and held-out measurements."""
