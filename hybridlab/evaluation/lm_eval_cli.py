"""lm-eval's own command line with hybridlab's model registered as ``--model hybridlab``.

lm-eval finds models only in its registry and has no plugin discovery, so its ``lm_eval``
command cannot load ours; this module imports the adapter (which registers it) and hands the
arguments to lm-eval's CLI unchanged::

    python -m hybridlab.evaluation.lm_eval_cli --model hybridlab \\
        --model_args checkpoint=runs/train/<run> --device cpu --batch_size 16 \\
        --include_path hybridlab/evaluation/tasks --tasks hybridlab_local

See ``hybridlab.evaluation.lm_eval`` for the model arguments.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    # Importing the adapter registers it with lm-eval's model registry.
    import hybridlab.evaluation.lm_eval  # noqa: F401

    cli_evaluate()


if __name__ == "__main__":
    main()
