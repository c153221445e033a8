"""Secrets the cluster creates for itself (the expert-worker RPC secret)."""
