"""SPEED: pipelined decoding of looped decoders and early-exit self-speculation for Llama-family models."""

from lmsqueeze.methods.speed.calibrate import Calibration, CalibrationConfig, calibrate_self_speculation
from lmsqueeze.methods.speed.early_exit import SelfSpecStats, plain_greedy, self_speculative_generate
from lmsqueeze.methods.speed.pipeline import PipelineStats, mixed_pass, speed_decode_looped

__all__ = ["Calibration", "CalibrationConfig", "PipelineStats", "SelfSpecStats", "calibrate_self_speculation",
           "mixed_pass", "plain_greedy", "self_speculative_generate", "speed_decode_looped"]
