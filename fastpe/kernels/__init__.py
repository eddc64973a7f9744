"""Fused kernels. Nothing here is imported by ``import fastpe``; the ops load it on demand."""
