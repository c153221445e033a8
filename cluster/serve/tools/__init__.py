"""Tool calling: the formats per family and which a checkpoint gets (formats), parsing whole and
streamed text (parsing), forced calls as a grammar (grammar)."""
