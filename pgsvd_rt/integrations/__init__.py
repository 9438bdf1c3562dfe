"""Engine integrations: each is its own room on top of the ops contract and the checkpoint reader.

- :mod:`pgsvd_rt.integrations.hf`: a transformers ``HfQuantizer`` for quant_method ``"pgsvd"``,
  registered by ``import pgsvd_rt``, so ``AutoModelForCausalLM.from_pretrained(ckpt)`` builds
  the model with :class:`~pgsvd_rt.nn.LowRankLinear` modules.
- :mod:`pgsvd_rt.integrations.vllm`: a vLLM quantization method, registered by the
  ``vllm.general_plugins`` entry point :func:`register_vllm` (vLLM calls it in every process).

Neither imports its engine until it is used: ``import pgsvd_rt`` works without vLLM.
"""


def register_vllm() -> None:
    """The ``vllm.general_plugins`` entry point: registers quant_method ``"pgsvd"`` with vLLM.

    Harmless when the served model is not ours: it only adds a name to vLLM's registry.
    """
    from pgsvd_rt.integrations import vllm

    vllm.register()
