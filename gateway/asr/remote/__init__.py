"""The remote ASR backends: the Redis Streams worker pool and OpenAI-compatible servers."""
