"""The output side of the engine: RequestOutput, incremental text with stop strings, and folding outputs."""
