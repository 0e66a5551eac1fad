"""``hybridlab eval``: lm-eval tasks on a checkpoint or on study trials, scores recorded.

A study trial's scores go into ``hl_evaluation`` (harness "lm-eval" and lm-eval's version; a
re-evaluation replaces that trial's earlier lm-eval rows for the same tasks) and onto the Optuna
trial as user attributes ``lm_eval/<task>/<metric>``, both in one transaction. Optuna's API
refuses to touch a finished trial, so those attributes are written to its
``trial_user_attributes`` table directly, the row format Optuna itself writes. A bare checkpoint's
scores are printed only: the tables are keyed by study and trial.

Hub tasks are checked before anything loads (``hub.check_hub_tasks``): offline and uncached,
they fail in about a second with a message naming the task. A user's own tasks come from
``--include-path`` folders or as a task YAML's path in ``--tasks``; the data files a task YAML
names are read relative to that YAML (``task_manager``), from whichever folder this runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from hybridlab.evaluation.hub import check_hub_tasks, local_task_names, require_lm_eval
from hybridlab.evaluation.loading import (
    EvalError,
    ModelSource,
    resolve_checkpoint,
    resolve_trial,
    top_trials,
)
from hybridlab.evaluation.tasks import LOCAL_GROUP, LOCAL_TASKS, TASKS_DIR
from hybridlab.store import (
    Evaluation,
    StorageError,
    default_sqlite_url,
    open_engine,
    session_scope,
    set_trial_user_attrs,
)

if TYPE_CHECKING:
    from lm_eval.api.model import LM

HARNESS = "lm-eval"
# lm-eval's default of 100,000 bootstrap resamples costs minutes on a CPU for a perplexity
# stderr whose second digit is already stable at 1,000.
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class Score:
    task: str
    metric: str  # lm-eval's name; ",<filter>" appended when the filter is not "none"
    value: float
    stderr: float | None


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks: give at least one task name")
    return list(dict.fromkeys(tasks))


def task_folders(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()
                 ) -> tuple[list[str], list[Path]]:
    """(the tasks as lm-eval takes them, the folders it indexes besides its own tasks).

    The folders are hybridlab's local tasks, each ``--include-path`` and the folder of each task
    given as a YAML file, whose path may be relative to the working directory; lm-eval gets that
    file's absolute path, and its folder lets the tasks and groups beside it resolve.
    """
    folders = [TASKS_DIR]
    for given in include_paths:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise EvalError(f"--include-path {given}: no such folder")
        folders.append(folder.resolve())
    resolved = []
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            path = Path(task).expanduser()
            if not path.is_file():
                raise EvalError(f"--tasks: no task file {task}")
            folders.append(path.resolve().parent)
            task = str(path.resolve())
        resolved.append(task)
    return resolved, list(dict.fromkeys(folders))


def run_lm_eval(lm: LM, tasks: Sequence[str], *, limit: float | None = None,
                bootstrap_iters: int = BOOTSTRAP_ITERS,
                folders: Sequence[Path] = (TASKS_DIR,)) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with the tasks of ``folders``; lm-eval's own only if needed.

    Indexing lm-eval's bundled tasks takes seconds, so it happens only when a task is not local.
    """
    import lm_eval

    from hybridlab.evaluation.task_manager import TaskFileManager

    local = local_task_names(folders)
    needs_hub = any(task not in local and not Path(task).is_file() for task in tasks)
    manager = TaskFileManager(include_path=[str(f) for f in folders],
                              include_defaults=needs_hub)
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known and not Path(task).is_file()]
    if unknown:
        raise EvalError(f"unknown task {', '.join(map(repr, unknown))}: neither a local task "
                        f"({', '.join(sorted(local))}) nor an lm-eval task, group or tag "
                        "(lm-eval ls tasks lists them)")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                      task_manager=manager, bootstrap_iters=bootstrap_iters,
                                      log_samples=False)
    if results is None:
        raise EvalError("lm-eval returned no results (not the rank-0 process?)")
    return results


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def scores(results: dict[str, Any]) -> list[Score]:
    """Every task's metrics from lm-eval's results (groups, which only list tasks, skipped)."""
    groups = set(results.get("groups") or {})
    found = []
    for task, entries in results["results"].items():
        if task in groups:
            continue
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            number = _number(value)
            if number is None or metric.endswith("_stderr") or not filter_name:
                continue
            stderr = _number(entries.get(f"{metric}_stderr,{filter_name}"))
            name = metric if filter_name == "none" else key
            found.append(Score(task, name, number, stderr))
    return found


def store_scores(storage_url: str, study: str, trial: int, found: Sequence[Score], *,
                 harness_version: str) -> None:
    """Replace the trial's lm-eval rows for these tasks and set its Optuna user attributes."""
    try:
        with open_engine(storage_url) as engine, session_scope(engine) as session:
            session.execute(sa.delete(Evaluation).where(
                Evaluation.study == study, Evaluation.trial == trial,
                Evaluation.harness == HARNESS,
                Evaluation.task.in_(sorted({s.task for s in found}))))
            session.add_all(Evaluation(study=study, trial=trial, task=s.task, metric=s.metric,
                                       value=s.value, stderr=s.stderr, harness=HARNESS,
                                       harness_version=harness_version) for s in found)
            set_trial_user_attrs(session, study, trial,
                                 {f"lm_eval/{s.task}/{s.metric}": s.value for s in found})
    except StorageError as err:
        raise EvalError(f"storage {storage_url}: {err}") from None


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hybridlab eval``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder (step_*) or the run folder "
                       "holding them; the architecture is arch.yaml beside it unless --arch")
    which.add_argument("--study", help="study whose --trial N or --top K trials to evaluate")
    parser.add_argument("--storage", help="database URL (default: sqlite:///<runs-dir>/<study>.db)")
    parser.add_argument("--runs-dir", default="runs",
                        help="where the default database <runs-dir>/<study>.db lives")
    parser.add_argument("--trial", type=int, help="the study trial to evaluate")
    parser.add_argument("--top", type=int, metavar="K",
                        help="evaluate the K best complete trials (Pareto front, by the first "
                        "objective, for multi-objective studies)")
    parser.add_argument("--arch", help="architecture file for --checkpoint")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated lm-eval tasks: local ({LOCAL_GROUP} = "
                        f"{', '.join(LOCAL_TASKS)}), lm-eval's (lambada_openai, hellaswag, "
                        "piqa, arc_easy, arc_challenge, winogrande, ...: network or cache), "
                        "names from --include-path, or a task YAML file's path; data files a "
                        "task YAML names are read relative to that YAML")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="folder of your own lm-eval task YAMLs (repeatable); a YAML path in "
                        "--tasks adds its folder by itself")
    parser.add_argument("--limit", type=_limit,
                        help="documents per task (a fraction when below 1)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="requests scored per forward pass (default: 16)")
    parser.add_argument("--max-length", type=int,
                        help="context window (default: the trial's training seq_len, else 2048)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' or the BPE tokenizer JSON the model was trained with")


def _sources(args: argparse.Namespace) -> tuple[list[ModelSource], str | None]:
    if args.checkpoint is not None:
        extra = [flag for flag, value in (("--trial", args.trial), ("--top", args.top),
                                          ("--storage", args.storage)) if value is not None]
        if extra:
            raise EvalError(f"{', '.join(extra)} go with --study, not --checkpoint")
        return [resolve_checkpoint(args.checkpoint, arch=args.arch)], None
    if args.arch is not None:
        raise EvalError("--arch goes with --checkpoint; a trial's architecture is recorded")
    if (args.trial is None) == (args.top is None):
        raise EvalError(f"--study {args.study}: give either --trial N or --top K")
    url = args.storage or default_sqlite_url(args.study, args.runs_dir)
    numbers = [args.trial] if args.trial is not None else top_trials(url, args.study, args.top)
    return [resolve_trial(url, args.study, n) for n in numbers], url


def _format(score: Score) -> str:
    value = f"{score.value:.4f}" if math.isfinite(score.value) else str(score.value)
    stderr = f" ± {score.stderr:.4f}" if score.stderr is not None else ""
    return f"  {score.task:<22} {score.metric:<18} {value}{stderr}"


def evaluate_sources(
    sources: Sequence[ModelSource], tasks: Sequence[str], *, url: str | None,
    limit: float | None = None, device: str | None = None, batch_size: int = 16,
    max_length: int | None = None, tokenizer: str = "byte", echo: Any = print,
    include_paths: Sequence[str | Path] = (),
) -> dict[int | None, list[Score]]:
    """Evaluate each source on ``tasks``; study trials' scores are stored when ``url`` is given.

    ``include_paths``: folders of further task YAMLs (``--include-path``).
    """
    require_lm_eval()
    tasks, folders = task_folders(tasks, include_paths)
    check_hub_tasks(tasks, folders)

    import lm_eval

    from hybridlab.evaluation.lm_eval import HybridLabLM

    results: dict[int | None, list[Score]] = {}
    for source in sources:
        echo(f"evaluating {source.describe()} on {', '.join(tasks)}")
        started = time.perf_counter()
        lm = HybridLabLM(source=source, tokenizer=tokenizer, device=device,
                         batch_size=batch_size, max_length=max_length)
        found = scores(run_lm_eval(lm, tasks, limit=limit, folders=folders))
        seconds = time.perf_counter() - started
        for score in found:
            echo(_format(score))
        stored = ""
        if url is not None and source.study is not None and source.trial is not None:
            store_scores(url, source.study, source.trial, found,
                         harness_version=lm_eval.__version__)
            stored = f"; stored in {url} (hl_evaluation, user attrs lm_eval/<task>/<metric>)"
        echo(f"  {len(found)} scores in {seconds:.1f} s{stored}")
        results[source.trial] = found
    return results


def evaluate_top_trials(
    url: str, study: str, tasks: Sequence[str], *, top_k: int, limit: float | None = None,
    echo: Any = print,
) -> dict[int | None, list[Score]]:
    """The search's final stage: lm-eval on the ``top_k`` best trials, scores stored."""
    sources = [resolve_trial(url, study, n) for n in top_trials(url, study, top_k)]
    return evaluate_sources(sources, tasks, url=url, limit=limit, echo=echo)


def eval_command(args: argparse.Namespace) -> int:
    """Run lm-eval tasks on a checkpoint or on study trials; store a trial's scores."""
    tasks = parse_tasks(args.tasks)
    sources, url = _sources(args)
    evaluate_sources(sources, tasks, url=url, limit=args.limit, device=args.device,
                     batch_size=args.batch_size, max_length=args.max_length,
                     tokenizer=args.tokenizer, include_paths=args.include_path,
                     echo=lambda line: print(line, flush=True))
    return 0
