"""The attention replica as a Ray Serve LLM server class (cluster/serve/app.py AttentionReplica,
adapted here): Ray's own ingress, our engine and data plane behind it."""
