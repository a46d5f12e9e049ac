"""Stage 5, report: figures, TensorBoard logs and the run's output folders.

Imports heads and below.
"""
