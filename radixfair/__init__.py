"""radixfair: LLM serving with RadixAttention and locality-aware fair scheduling."""

__version__ = "0.1.0"
