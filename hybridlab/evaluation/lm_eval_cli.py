"""lm-eval's own command line with hybridlab's model registered as ``--model hybridlab``.

lm-eval finds models only in its registry and has no plugin discovery, so its ``lm_eval``
command cannot load ours; this module imports the adapter (which registers it) and hands the
arguments to lm-eval's CLI unchanged::

    python -m hybridlab.evaluation.lm_eval_cli --model hybridlab \\
        --model_args checkpoint=runs/train/<run> --batch_size 16 \\
        --include_path hybridlab/evaluation/tasks --tasks hybridlab_local

One default differs: lm-eval's device is ``cuda:0`` even where there is no CUDA, so for
``--model hybridlab`` without ``--device`` (on the command line or in ``--config``) the device is
the model argument ``device=`` if given, else the one ``hybridlab eval`` picks: CUDA when
available, else the CPU. See ``hybridlab.evaluation.lm_eval`` for the model arguments.
"""

from __future__ import annotations

import argparse


def default_device(args: argparse.Namespace) -> None:
    """Set ``args.device`` for the hybridlab model when neither the command nor its config did."""
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import simple_parse_args_string

    from hybridlab.evaluation.loading import resolve_device

    if getattr(args, "command", None) != "run" or args.device is not None:
        return
    # lm-eval's precedence: command-line values over the config file's.
    config = EvaluatorConfig.load_yaml_config(args.config) if args.config else {}
    if (args.model or config.get("model")) != "hybridlab" or config.get("device") is not None:
        return
    model_args = args.model_args or config.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    args.device = str(model_args.get("device") or resolve_device(None))


def main() -> None:
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    # Importing the adapter registers it with lm-eval's model registry.
    import hybridlab.evaluation.lm_eval  # noqa: F401

    # lm_eval.__main__.cli_evaluate, with the device default set between parsing and running.
    setup_logging()
    cli = HarnessCLI()
    args = cli.parse_args()
    default_device(args)
    cli.execute(args)


if __name__ == "__main__":
    main()
