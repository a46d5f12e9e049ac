"""Stage 1, data: the image index, splits and folds, leakage checks, decoding, transforms and stain.

Imports nothing above it (only breakhis_tl.errors).
"""
