"""Stage 2, models: the frozen backbones (registry, foundation presets), batch-norm calibration
of random inits and the compute mode.

Imports data and below.
"""
