"""Frozen ImageNet backbones and trained heads on BreakHis and IDC, split by patient."""

__version__ = "0.1.0"
