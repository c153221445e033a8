"""The ingress: the thin HTTP half in front of the attention replicas (Ray Serve LLM splits its
OpenAiIngress and LLMServer the same way). It reads and bounds bodies, authenticates, parses once
with a bounded depth, and keeps each in-flight request's resume state so that a stream survives
the replica that was generating it."""
