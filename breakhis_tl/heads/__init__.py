"""Stage 4, heads: the classifier heads, their fitting (the logistic-regression probe, epochs
of AdamW) and recipes.

Imports features, models, data, and breakhis_tl.metrics.
"""
