"""Benchmarks against torch.nn (cuDNN); committed reports live in benchmarks/results/<device>/."""
