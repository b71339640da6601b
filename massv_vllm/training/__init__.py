"""Training layer: everything that makes and evaluates drafters with transformers and DeepSpeed.

``data/`` reads data sets (records, prompt layout and labels, the feature cache); ``recipes``,
``distributed``, ``schedule``, ``prepare``, ``loop`` and ``trainer`` are the two-phase DeepSpeed
trainer; ``generation`` is the self-distillation data job (vLLM); ``modeling`` is the
transformers-side drafter and ``target_features`` computes the target's image features exactly as
vLLM does. ``train/*.py`` are thin entry points over ``trainer.main`` and ``generation.main``.
"""
