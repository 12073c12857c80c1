"""Configuration: the default tree (defaults.py) and the CfgNode that reads, merges and checks it (config.py)."""

from detection.config.config import CfgNode, get_cfg, save_config, setup_cfg

__all__ = ["CfgNode", "get_cfg", "save_config", "setup_cfg"]
