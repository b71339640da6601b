"""Testing layer: fixtures and harnesses for the tests, the examples and the benchmarks (never
imported by the serving or training code): tiny checkpoints and synthetic data sets built locally,
the lossless (T=0) check, ``vllm serve`` helpers and the drafter probe."""
