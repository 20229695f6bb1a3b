"""The audit: what a dataset silently carries, measured before anyone trains on it.

``lls``: per-token log-probs of every answer under a trait teacher and a reference (two teacher-forced passes,
renormalised over the grammar's tokens where the data was sampled under one); ``summary``: per-example
log-likelihood shift (LLS), divergence positions, entangled numbers, the dataset's mean with a bootstrap CI.
"""
