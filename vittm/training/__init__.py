"""Training machinery shared by every task: the LightningModule base (EMA, optimizer, schedule, numerics, compile),
checkpoints, the console, config checks, the CPU budget guard, the model summary job.

Depends on models, data and core; the tasks build on it.
"""
