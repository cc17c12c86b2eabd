"""nn.Modules, host code and numerics checks around the persistent kernels."""
