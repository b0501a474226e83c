"""The engine: planning a request, the continuous batch, solo generate(), and the transformers compatibility layer."""
