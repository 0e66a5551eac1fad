"""Evaluation of trained candidates with lm-eval: model adapter, local tasks, ``hybridlab eval``.

``lm_eval`` (the adapter) imports lm-eval and is imported only when an evaluation runs;
``run`` (the command), ``loading`` and ``hub`` do not import it, so the CLI stays quick.
"""
