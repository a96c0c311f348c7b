"""The early-exit Llama as an out-of-tree vLLM model (DESIGN §3, ``vllm_backend/``).

``options`` (no vLLM import) reads and checks the early-exit settings that reach the model
through ``hf_overrides``; ``plugin`` registers the architecture with vLLM; ``model`` is the
model itself; ``records`` carries what one forward did out to ``capture`` (in-process runs)
and ``serve_log`` (a ``vllm serve`` process). See docs/vllm.md.
"""
