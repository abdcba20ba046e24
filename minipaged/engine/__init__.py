"""The serving engine (paper §4.5, §5): sequences, THE scheduler, the model runner, the sampler, the LLM facade.

Read it in this order, following one request from ``LLM.generate`` down to the kernel:
``llm.py`` -> ``scheduler.py`` -> ``model_runner.py`` -> ``minipaged.model`` -> ``minipaged.ops``;
``sequence.py`` holds a request's state, ``sampler.py`` and ``beam_search.py`` turn logits into tokens.
"""

from minipaged.engine.llm import LLM, CompletionOutput, LLMEngine, RequestOutput, RunStats
from minipaged.engine.model_runner import ModelRunner, StandInRunner
from minipaged.engine.scheduler import Scheduler
from minipaged.engine.sequence import BeamSearchParams, SamplingParams, Sequence, SequenceGroup

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "LLMEngine",
    "ModelRunner",
    "RequestOutput",
    "RunStats",
    "SamplingParams",
    "Scheduler",
    "Sequence",
    "SequenceGroup",
    "StandInRunner",
]
