"""Benchmark harness for fastload (see README.md)."""
