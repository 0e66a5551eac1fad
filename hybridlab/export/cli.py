"""``hybridlab export``: the arguments and the command, for ``hybridlab/cli.py`` to register."""

from __future__ import annotations

import argparse
import sys

from hybridlab.export.common import ExportError
from hybridlab.export.writer import FORMATS
from hybridlab.scale import STRATEGIES, ScaleError, parse_target
from hybridlab.store import StorageError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``export``'s arguments to its subparser."""
    parser.add_argument("--study", help="study name (default: the only study in the database)")
    parser.add_argument("--storage", help="database URL (default: sqlite:///runs/<study>.db)")
    parser.add_argument("--runs-dir", default="runs", help="where the default database lives")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true",
                       help="the best trial; with several objectives, every Pareto-optimal one")
    which.add_argument("--pareto", action="store_true",
                       help="every Pareto-optimal trial, one subfolder each")
    which.add_argument("--trial", type=int, metavar="N", help="trial number N")
    which.add_argument("--checkpoint", metavar="PATH",
                       help="not a study: the folder `hybridlab train` wrote (its newest "
                            "checkpoint) or one of its step_* checkpoints")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hybridlab: arch.yaml + weights + model card; mamba_ssm: "
                             "MambaLMHeadModel config + weights; megatron: hybrid pattern and "
                             "arguments; hf: a transformers NemotronH, Bamba or "
                             "GraniteMoeHybrid folder with weights and tokenizer")
    parser.add_argument("--out", required=True, help="new folder to write (must not exist)")
    parser.add_argument("--lossy", action="store_true",
                        help="when the format cannot represent the architecture, write its "
                             "closest config without weights and list every change (LOSSY.md)")
    parser.add_argument("--task", help="which task's checkpoint, for a study trained on a suite")
    parser.add_argument("--scale-to", metavar="TARGET",
                        help="export the architecture extrapolated to TARGET parameters (1.3B, "
                             "350M, or 4x the trial's): config only, untrained, no weights")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="with --scale-to: stack, stretch or both (default; see "
                             "hybridlab.scale)")
    parser.add_argument("--scale-d-state", action="store_true",
                        help="with --scale-to: grow the SSM state size with d_model")


def export_command(args: argparse.Namespace) -> int:
    """Export the best, Pareto-optimal or one chosen trial of a study in a trainer's format."""
    from hybridlab.export.study import StudyExport, export_scaled, export_study
    from hybridlab.export.trained import export_checkpoint

    selection = "best" if args.best else "pareto" if args.pareto else args.trial
    try:
        if args.checkpoint is not None:
            for flag, given in (("--study", args.study), ("--storage", args.storage),
                                ("--task", args.task), ("--scale-to", args.scale_to)):
                if given is not None:
                    raise ExportError(f"{flag} does not apply with --checkpoint (a study's "
                                      "option); to extrapolate a trained architecture run "
                                      "`hybridlab scale <folder>/arch.yaml --to ...`")
            result = export_checkpoint(args.checkpoint, fmt=args.format, out=args.out,
                                       lossy=args.lossy)
            done = StudyExport(out=result.folder, description=f"checkpoint {args.checkpoint}",
                               exports=(result,), skipped=())
        elif args.scale_to is None:
            for flag, given in (("--strategy", args.strategy), ("--scale-d-state",
                                                               args.scale_d_state)):
                if given:
                    raise ScaleError(flag, "applies only with --scale-to")
            done = export_study(
                args.study, selection=selection, fmt=args.format, out=args.out,
                storage=args.storage, lossy=args.lossy, task=args.task, runs_dir=args.runs_dir,
            )
        else:
            if args.task is not None:
                raise ScaleError("--task", "an extrapolated export has no checkpoint to choose")
            done = export_scaled(
                args.study, selection=selection, fmt=args.format, out=args.out,
                target=parse_target(args.scale_to, field="--scale-to"),
                strategy=args.strategy or "both", scale_d_state=args.scale_d_state,
                storage=args.storage, lossy=args.lossy, runs_dir=args.runs_dir,
            )
    except ScaleError as err:
        flag = err.field if err.field.startswith("--") else "--scale-to"
        print(f"hybridlab export: error: {flag}: {err.message}", file=sys.stderr)
        return 2
    except (ExportError, StorageError) as err:
        print(f"hybridlab export: error: {err}", file=sys.stderr)
        return 2
    print(f"selected {done.description}")
    for line in done.skipped:
        print(f"skipped {line}")
    for result in done.exports:
        kind = result.format + (f" ({result.flavour})" if result.flavour else "")
        state = "faithful" if result.faithful else f"LOSSY, {len(result.changes)} changes"
        weights = result.weights or ("none (untrained)" if args.scale_to else "none")
        print(f"wrote {result.folder}: {kind}, {state}, weights: {weights}")
        for change in result.changes:
            print(f"  changed {change.describe()}")
        for note in result.notes:
            print(f"  note: {note}")
    return 0
