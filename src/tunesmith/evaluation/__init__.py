"""Evaluation: perplexity, task scores by generation, before/after reports."""
