"""The tasks: classification and segmentation, each a LightningModule on the training machinery plus what it needs
(metrics, heads, inference), and ``run``: ``train(cfg)`` / ``evaluate(cfg)`` for whichever task ``task.name`` says.

Depends on training, models, data and core.
"""
