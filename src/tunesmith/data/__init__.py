"""Data: files -> rows -> conversations -> rendered text -> input_ids + labels -> batches.

assemble.py is the one entry point from a config to a run's examples (task prefixes, the held-out split,
weighted mixing and replay of the general corpus included); everything that reports on data calls it.
"""
