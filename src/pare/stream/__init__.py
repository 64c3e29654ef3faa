"""Prune models larger than memory: streamed from disk one decoder layer at a time, resumable."""

from pare.stream.config import StreamConfig, parse_bytes
from pare.stream.run import StreamPlan, plan_stream, stream_prune

__all__ = ["StreamConfig", "StreamPlan", "parse_bytes", "plan_stream", "stream_prune"]
