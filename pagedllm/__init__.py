"""pagedllm: a vLLM-class inference engine in readable Python.

The public surface mirrors vLLM's, so a vLLM script runs by changing its import.
"""

from pagedllm.entrypoints.llm import LLM
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.version import __version__
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
