"""KV slot allocation and the radix tree over token ids (pure Python, no torch)."""
