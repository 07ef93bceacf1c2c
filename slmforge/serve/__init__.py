"""OpenAI-compatible serving: `create_app` (FastAPI) over the batch engine, and a load generator."""
