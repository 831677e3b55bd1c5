"""Triton kernels, one op per module. Imported lazily, when an op runs on CUDA (or under TRITON_INTERPRET=1)."""
