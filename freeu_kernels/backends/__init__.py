"""Backends of fused_concat: torch (any device), triton (one fused launch), cuda (the C++ extension)."""
