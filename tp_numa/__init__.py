"""tp_numa: tensor-parallel LLM inference for multi-socket CPUs.

One MPI rank per NUMA node holds a slice of every weight of a GGUF model in its node's
memory; matmuls run on the quantized blocks in native ops; ranks meet at all-reduces
through shared memory. ``tp_numa.load(model)`` gives a generator object; the model itself
is a tree of plain ``torch.nn.Module``s.
"""
__version__ = "0.1.0"


def load(model: str, **kwargs):
    """Load a GGUF model (path or short name such as 'qwen2.5-coder-0.5b') for generation.

    Returns a ``tp_numa.engine.LLM``; see its docstring for the options.
    """
    from .engine import LLM

    return LLM.load(model, **kwargs)
