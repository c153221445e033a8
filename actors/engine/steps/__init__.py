"""One step on the host side: the index data a step feeds the model, and a step in flight."""
