"""Config choice and the static (ahead-of-time) resource check of the kernels."""
