"""Sinks: filled chunks -> tensors (host memory, a CUDA device) or files."""

from .base import Completion, Sink, staged_segments
from .host import HostSink, output_dtype

__all__ = ["Completion", "Sink", "HostSink", "output_dtype", "staged_segments"]
