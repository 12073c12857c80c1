"""Training and evaluation: the Trainer, checkpoints, COCO evaluation, process launch and the commands."""
