"""Fast ops (C++ / Triton) and their plain references."""
