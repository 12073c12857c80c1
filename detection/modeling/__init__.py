"""Detectors: the adapter every stage sees, the backbone + FPN and one module per meta-architecture."""
