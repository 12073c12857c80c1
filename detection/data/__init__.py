"""Datasets, the augmentation plan, the training loader and the synthetic dataset."""
