"""Runnable studies of mcq_jax on real data."""
