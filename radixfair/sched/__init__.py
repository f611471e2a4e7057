"""Scheduler and scheduling policies (pure Python, no torch)."""
