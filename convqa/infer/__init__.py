"""The inference stage: engines, prompts, isolated runs, the reference-quantized model and the server."""
