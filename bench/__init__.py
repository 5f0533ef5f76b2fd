"""Benchmarks: one runnable file per measurement (see DESIGN.md section 9)."""
