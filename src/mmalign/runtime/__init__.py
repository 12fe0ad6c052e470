"""Shared training steps as plain functions: checkpoints, batching, optimisation, metrics."""
