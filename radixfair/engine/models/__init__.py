"""Model architectures written against radixfair's KV pool."""
