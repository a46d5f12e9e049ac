"""Stage 3, features: extraction of frozen-backbone features and their on-disk cache.

Imports models, data and below.
"""
