"""The DiffSegmenter method on top of the models: prompts, attention fusion, self-attention refinement."""
