"""Benchmarks for massv-vllm: acceptance and speed-up in vLLM, TVD diagnostic, cost at real shapes,
and the ablation table. Run from the repository root, e.g. ``python -m benchmarks.acceptance -h``;
see benchmarks/README.md."""
