"""Meta-architectures the project implements itself (CondInst, SOLOv2) and their shared mask operations."""
