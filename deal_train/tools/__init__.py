"""Experiment tools on top of the trainer: compare, sweep, results, bench, estimate_memory, export."""
