"""Triton kernels and their thin launchers; nothing else lives here."""
