"""HTTP request shapes and routes: predict (the seed contract) and the OpenAI-compatible API."""
