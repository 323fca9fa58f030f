"""genops' OpenAI-compatible endpoint: the server process and its control from other processes."""
