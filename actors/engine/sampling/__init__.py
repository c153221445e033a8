"""Pieces of token selection that sit beside the sampler: counter-based noise, per-request device
state, log-probabilities and grammar masks."""
