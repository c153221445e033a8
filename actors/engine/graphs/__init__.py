"""Whole-step device graphs for the decode path (CUDA graphs; see cuda_graphs.py)."""
