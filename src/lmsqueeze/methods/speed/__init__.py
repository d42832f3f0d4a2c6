"""SPEED: pipelined decoding of looped decoders and early-exit self-speculation for Llama-family models."""

from lmsqueeze.methods.speed.calibrate import Calibration, CalibrationConfig, calibrate_self_speculation
from lmsqueeze.methods.speed.early_exit import SelfSpecStats, plain_greedy, self_speculative_generate
from lmsqueeze.methods.speed.pipeline import PipelineStats, mixed_pass, speed_decode_looped
from lmsqueeze.methods.speed.static_pipeline import StaticStats, greedy_decode_static, speed_decode_static

__all__ = ["Calibration", "CalibrationConfig", "PipelineStats", "SelfSpecStats", "StaticStats",
           "calibrate_self_speculation", "greedy_decode_static", "mixed_pass", "plain_greedy",
           "self_speculative_generate", "speed_decode_looped", "speed_decode_static"]
