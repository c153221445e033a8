"""Whole steps as CUDA graphs (step_graphs.py) and what they cost by token count (step_cost.py)."""
