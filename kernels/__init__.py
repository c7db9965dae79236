"""Fast paths for the GPU, each beside a plain PyTorch reference with the same signature.

`choose(kernel, device)` picks the implementation for a device: the fast one where it is supported,
unless AVATAR_FORCING_KERNELS=reference forces the references everywhere (for A/B runs and debugging).
Every kernel has a test comparing the two on random inputs of realistic shapes (tests/test_kernels.py).
"""

# No import guard here, unlike the other folders: transformers probes for a top-level `kernels` package
# (an unrelated PyPI project), and a guard would break that probe whenever this folder is on sys.path.
