"""Serving: an OpenAI-compatible server (batched decoding) and the side-by-side page."""
