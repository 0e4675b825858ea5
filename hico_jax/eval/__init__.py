"""Long-context evaluations: needle in a video haystack (niah)."""
