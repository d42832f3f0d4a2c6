"""SPEED: pipelined decoding of looped decoders and early-exit self-speculation for Llama-family models."""

from lmsqueeze.methods.speed.pipeline import PipelineStats, mixed_pass, speed_decode_looped

__all__ = ["PipelineStats", "mixed_pass", "speed_decode_looped"]
