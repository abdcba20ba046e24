"""The serving engine (paper §4.5, §5): sequences, THE scheduler, the model runner, the sampler, the LLM facade.

Read it in this order, following one request from ``LLM.generate`` down to the kernel:
``llm.py`` -> ``scheduler.py`` -> ``model_runner.py`` -> ``minipaged.model`` -> ``minipaged.ops``.
"""

from minipaged.engine.llm import LLM, CompletionOutput, LLMEngine, RequestOutput, RunStats
from minipaged.engine.model_runner import ModelRunner, StandInRunner
from minipaged.engine.scheduler import Scheduler
from minipaged.engine.sequence import SamplingParams, Sequence

__all__ = [
    "LLM",
    "CompletionOutput",
    "LLMEngine",
    "ModelRunner",
    "RequestOutput",
    "RunStats",
    "SamplingParams",
    "Scheduler",
    "Sequence",
    "StandInRunner",
]
