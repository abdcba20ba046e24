"""The transformer that produces the K/V the caches hold (paper §2), reading and writing them
through whichever cache the step's metadata describes (§4.1); and its weights."""

from minipaged.model.llama import Llama, ModelConfig
from minipaged.model.loader import BUILTIN_MODELS, from_transformers, load_model, random_model

__all__ = ["BUILTIN_MODELS", "Llama", "ModelConfig", "from_transformers", "load_model", "random_model"]
