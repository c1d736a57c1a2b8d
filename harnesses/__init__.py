"""Harnesses: programs that run the recipes many times (benchmark, sweep, memory ladder, memory validation,
adapter vs full) and what only they use (compare: one child process per configuration; adapters: bottleneck adapters)."""
