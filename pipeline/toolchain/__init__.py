"""Build-host toolchains: cross linking, CUDA ahead-of-time compilation, and reading what they produce."""
