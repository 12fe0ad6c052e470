"""Evaluation: benchmark runners (POPE, CHAIR, ...) and their model-free scoring functions."""
