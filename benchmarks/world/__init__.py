"""The synthetic visual world: end-to-end MASSV evidence without downloads (see README.md).

``python -m benchmarks.world run --out DIR [--small]`` generates the world, trains a Qwen2.5-VL
target and a Qwen2 small LM from scratch on it, builds and trains the MASSV drafters with the
project's scripts and benchmarks them against the text-only drafter in vLLM.
"""
