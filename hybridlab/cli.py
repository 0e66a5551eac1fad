"""The ``hybridlab`` command: thin subcommands over typed functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybridlab import __version__, code_version
from hybridlab.config import (
    ArchConfig,
    ConfigError,
    line_for,
    load_yaml_file,
    load_yaml_with_lines,
)
from hybridlab.cost import cost_report, measure_tokens_per_second, param_count
from hybridlab.errors import HybridlabError
from hybridlab.evaluation.run import add_eval_arguments, eval_command
from hybridlab.export import add_export_arguments, export_command
from hybridlab.export.importing import FORMATS as IMPORT_FORMATS
from hybridlab.files import write_text_atomic
from hybridlab.model import HybridLM
from hybridlab.presets import PRESETS, preset
from hybridlab.published import names as published_names
from hybridlab.scale import STRATEGIES
from hybridlab.train import TrainConfig, settings_key, train
from hybridlab.units import format_bytes
from hybridlab_dashboard import add_dashboard_arguments, dashboard_command


def load_arch(spec: str) -> ArchConfig:
    """A preset name or a path to an architecture YAML/JSON file."""
    if spec in PRESETS:
        return preset(spec)
    if not Path(spec).exists():
        raise ConfigError(
            "<config>", f"neither a file nor a preset (presets: {', '.join(sorted(PRESETS))})",
            source=spec,
        )
    return ArchConfig.load(spec)


def inspect(args: argparse.Namespace) -> int:
    """Build an architecture, print its cost per layer, run it and decode a few tokens."""
    config = load_arch(args.config)
    contexts = args.contexts
    print(f"pattern {config.pattern}  layers {config.n_layers}  d_model {config.d_model}  "
          f"vocab {config.vocab_size}  hash {config.canonical_hash()}")
    reports = [cost_report(config, c) for c in contexts]
    header = f"{'#':>3} {'type':<10} {'params':>10} {'FLOPs/tok':>12}" + "".join(
        f" {'state@' + str(c):>13}" for c in contexts)
    print(header)
    for i, layer in enumerate(reports[0].layers):
        states = "".join(f" {format_bytes(r.layers[i].state_bytes):>13}" for r in reports)
        print(f"{i:>3} {layer.type:<10} {layer.params:>10,} {layer.flops_per_token:>12,.0f}"
              + states)
    totals = "".join(f" {format_bytes(r.state_bytes):>13}" for r in reports)
    print(f"{'':>3} {'total':<10} {reports[0].params:>10,} "
          f"{reports[0].flops_per_token:>12,.0f}{totals}")
    print("(state: bf16 cache, fp32 SSM state, one sequence; FLOPs: forward at the first context)")

    model = HybridLM(config, seed=args.seed).eval()
    tps = measure_tokens_per_second(model, batch_size=args.batch, seqlen=args.seqlen,
                                    seed=args.seed)
    print(f"forward throughput on {model.device}: {tps:,.0f} tokens/s "
          f"(batch {args.batch} x {args.seqlen}, torch threads {torch.get_num_threads()})")
    prompt = torch.randint(config.vocab_size, (1, 8),
                           generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    out = model.generate(prompt, args.generate)
    elapsed = time.perf_counter() - start
    print(f"decoded {args.generate} tokens with the cache in {elapsed:.2f} s: "
          f"{out[0, 8:].tolist()}")
    return 0


def _parse_value(text: str) -> object:
    """A command-line value as YAML reads it: 4 -> int, 0.5 -> float, true -> bool."""
    return load_yaml_with_lines(text, source="<command line>")[0]


def _options(pairs: Sequence[str], flag: str) -> dict[str, object]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(flag, f"expected KEY=VALUE, got {pair!r}")
        options[key] = _parse_value(value)
    return options


def load_train_config(path: str | None, overrides: dict[str, object]) -> TrainConfig:
    data: dict[str, object] = {}
    lines: dict[str, int] = {}
    if path is not None:
        loaded, lines = load_yaml_file(path)
        if not isinstance(loaded, dict):
            raise ConfigError("<document>", "must be a mapping of train settings", source=path)
        data.update(loaded)
    data.update(overrides)
    try:
        return TrainConfig.from_dict(data, source=path)
    except ConfigError as err:
        # The file's keys are top-level fields; the error names them as train.<field>.
        line = line_for(err.field.removeprefix("train."), lines)
        raise ConfigError(err.field, err.message, source=path, line=line) from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def train_command(args: argparse.Namespace) -> int:
    """Train one architecture on a task and print its metrics and checkpoint folder."""
    from hybridlab.data.tasks import make_task

    overrides: dict[str, object] = {"seed": args.seed}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.device is not None:
        overrides["device"] = args.device
    overrides.update(_options(args.set, "--set"))
    cfg = load_train_config(args.config, overrides)
    task = make_task(args.task, seed=args.seed, **_options(args.task_option, "--task-option"))
    arch = load_arch(args.arch)
    if arch.vocab_size != task.vocab_size:
        print(f"vocab_size {arch.vocab_size} -> {task.vocab_size} (the task's vocabulary)")
        arch = dataclasses.replace(arch, vocab_size=task.vocab_size)
    # The folder is keyed by everything that decides the weights, so a changed setting starts
    # afresh instead of resuming a checkpoint trained differently.
    key = settings_key(cfg, task)
    out = Path(args.out) if args.out else (
        Path("runs/train") / f"{arch.canonical_hash()}-{_slug(args.task)}-{key}")
    print(f"training {arch.pattern} ({arch.canonical_hash()}) on {task.name}: "
          f"{cfg.steps} steps x {cfg.batch_size} x {task.seq_len} tokens, checkpoints in {out}")
    model = HybridLM(arch, seed=args.seed)
    started = time.perf_counter()

    def show(step: int, metrics: dict[str, float]) -> bool:
        values = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"step {step:>6}  {time.perf_counter() - started:7.1f}s  {values}", flush=True)
        return False

    # A bar on a terminal; piped into a log, a plain line per log interval.
    result = train(model, task, cfg, checkpoint_dir=out, callback=show,
                   progress="bar" if sys.stderr.isatty() else "lines")
    summary = {
        "status": result.status, "reason": result.reason, "steps": result.steps,
        "tokens": result.tokens, "seconds": round(result.seconds, 2),
        "metrics": result.metrics, "checkpoint": str(result.checkpoint) if result.checkpoint
        else None, "task": task.fingerprint(), "recovered": result.recovered,
    }
    if out.is_dir():
        arch.save(out / "arch.yaml")
        # What `hybridlab export --checkpoint` reads: the task (and its tokenizer) it trained on.
        run = {"task": args.task, "task_options": _options(args.task_option, "--task-option"),
               "task_fingerprint": task.fingerprint(), "code_version": code_version(),
               **{k: summary[k] for k in ("status", "steps", "metrics")}}
        write_text_atomic(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0 if result.status != "diverged" else 1


def _context_list(text: str) -> list[int]:
    """An argparse type: comma-separated context lengths, each an integer >= 1."""
    return [_at_least_one(part.strip()) for part in text.split(",")]


def _at_least_one(text: str) -> int:
    """An argparse type for counts and intervals: an integer >= 1 (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def search_command(args: argparse.Namespace) -> int:
    """Run an architecture search: Optuna proposes, Ray workers train, the database records."""
    from hybridlab.search.runner import run_search

    summary = run_search(
        args.space, study=args.study, storage_url=args.storage, workers=args.workers,
        trials=args.trials, ray_address=args.ray_address, runs_dir=args.runs_dir,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        allow_space_change=args.allow_space_change, progress_every=args.progress_every,
    )
    print(f"done: {summary.finished} trials finished ({summary.complete} complete, "
          f"{summary.pruned} pruned or rejected, {summary.failed} failed attempts) in "
          f"{summary.wall_seconds:.1f} s; training {summary.train_seconds:.1f} worker-s, "
          f"time outside training {100 * summary.overhead_share:.0f}% of worker time")
    print(f"inspect: hybridlab status --study {summary.study} --storage {summary.storage_url}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    """Show a study's trials: state, pattern, cost and objectives; with promotion rungs, the
    promoted runs and the rank correlation between proxy and promoted metrics."""
    from hybridlab.search.status import study_table

    print(study_table(args.study, args.storage, runs_dir=args.runs_dir))
    return 0


def scale_command(args: argparse.Namespace) -> int:
    """Extrapolate an architecture (a file, a preset or a study's trial) to a larger size and
    write it as arch.yaml; prints the source beside the result."""
    from hybridlab.scale import ScaleError, parse_target, scale

    flags = {"strategy": "--strategy", "context": "--context"}
    try:
        target = parse_target(args.to, field="--to")
        source, origin = _scale_source(args)
        scaled = scale(source, target, strategy=args.strategy, context=args.context,
                       scale_d_state=args.scale_d_state)
    except ScaleError as err:
        raise ScaleError(flags.get(err.field, "--to"), err.message) from None
    print(f"{origin} -> {target.describe()} by {args.strategy}")
    print(scaled.report())
    scaled.config.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _scale_source(args: argparse.Namespace) -> tuple[ArchConfig, str]:
    """The architecture ``scale`` starts from, and a phrase saying where it came from."""
    by_trial = args.best or args.trial is not None
    if args.arch is not None and by_trial:
        flag = "--best" if args.best else "--trial"
        raise ConfigError(flag, f"give ARCH ({args.arch}) or {flag}, not both")
    if args.arch is not None:
        return load_arch(args.arch), args.arch
    if not by_trial:
        raise ConfigError("ARCH", "give an architecture (file or preset), or --best or "
                          "--trial N with --study")
    from hybridlab.export.study import select_archs

    chosen = select_archs(args.study, selection="best" if args.best else args.trial,
                          storage=args.storage, runs_dir=args.runs_dir)
    if len(chosen.trials) > 1:
        numbers = ", ".join(str(t.trial.number) for t in chosen.trials)
        raise ConfigError("--best", f"{chosen.description}; scale writes one architecture: "
                          f"choose one of trials {numbers} with --trial N")
    return chosen.trials[0].arch, f"{chosen.description} of study {chosen.study!r}"


def import_command(args: argparse.Namespace) -> int:
    """Read a published hybrid's config (transformers NemotronH / Bamba / GraniteMoeHybrid /
    Jamba, mamba_ssm, Megatron arguments, an export folder or a shipped layout) into an
    architecture file; what hybridlab cannot build is refused with the field and reason."""
    from hybridlab.export.importing import import_config
    from hybridlab.scale import ScaleError, parse_target, scale

    if args.scale_to is None:
        for flag, given in (("--strategy", args.strategy), ("--scale-d-state",
                                                           args.scale_d_state)):
            if given:
                raise ConfigError(flag, "applies only with --scale-to")
    imported = import_config(args.source, fmt=args.format, lossy=args.lossy)
    arch = imported.arch
    state = ("faithful" if imported.faithful
             else f"LOSSY, {len(imported.changes)} changes")
    print(f"imported {imported.source} ({imported.format}, {state}): pattern {arch.pattern}, "
          f"d_model {arch.d_model}, {param_count(arch):,} params")
    for change in imported.changes:
        print(f"  changed {change.describe()}")
    for note in imported.notes:
        print("  note: " + note.replace("\n", "\n        "))
    if args.scale_to is not None:
        try:
            scaled = scale(arch, parse_target(args.scale_to, field="--scale-to"),
                           strategy=args.strategy or "both", scale_d_state=args.scale_d_state)
        except ScaleError as err:
            flag = err.field if err.field.startswith("--") else "--scale-to"
            raise ScaleError(flag, err.message) from None
        print(scaled.report())
        arch = scaled.config
    out = Path(args.out)
    write_text_atomic(out, arch.to_json() if out.suffix == ".json" else arch.to_yaml())
    print(f"wrote {out}")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    """Extrapolate a finished study's best trials (and a transformer and a pure-SSM baseline) to
    each rung of its space's promotion section, retrain them and record them; rerun to resume."""
    from hybridlab.search.promotion import load_stage, promote
    from hybridlab.search.status import study_table
    from hybridlab.store import load_study, resolve_study

    name, url = resolve_study(args.study, args.storage, args.runs_dir)
    space = load_stage(load_study(name, url), name, args.space)
    summary = promote(name, url, space=space, runs_dir=args.runs_dir,
                      ray_address=args.ray_address)
    times = ", ".join(f"rung {k} {v:.1f} s" for k, v in summary.seconds_per_rung.items())
    print(f"done: {summary.trained} promoted runs trained, {summary.skipped} already trained "
          f"({times})")
    print(study_table(name, url, runs_dir=args.runs_dir))
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    """Train a fixed panel of reference architectures (transformer, Mamba-1, Mamba-2, a hybrid)
    at the space's width and budget over several seeds, on every task of the space; report per
    task each reference's mean and spread and whether the published ordering holds, by how many
    seed spreads. Results are stored in the space's database; rerun to resume."""
    from hybridlab.search.calibration import calibrate, check_panel, check_scale
    from hybridlab.search.runner import check_folder
    from hybridlab.search.space import load_space
    from hybridlab.store import (
        check_storage,
        create_tables,
        creation_lock,
        default_sqlite_url,
        open_engine,
    )
    from hybridlab.store.calibration import format_report, rank_agreement, verdicts

    space = load_space(args.space)
    references = tuple(r.strip() for r in args.references.split(",") if r.strip())
    check_panel(space, references)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{args.device}: no CUDA device is available")
    check_scale(args.budget_scale, "--budget-scale")
    if args.compare_scale is not None:
        check_scale(args.compare_scale, "--compare-scale")
    scales = [args.budget_scale] + ([args.compare_scale] if args.compare_scale else [])
    if not args.storage:
        check_folder(Path(args.runs_dir), "--runs-dir")
    url = args.storage or default_sqlite_url(space.name, Path(args.runs_dir).resolve())
    check_storage(url)
    with open_engine(url) as engine:
        with creation_lock(engine):
            create_tables(engine)
        runs = {scale: calibrate(space, engine, seeds=args.seeds, references=references,
                                 budget_scale=scale, device=args.device,
                                 echo=lambda line: print(line, flush=True))
                for scale in scales}
    for scale, measured in runs.items():
        print(f"\ncalibration of {space.name!r} at {scale:g}x its budget "
              f"({round(space.train.steps * scale)} steps), {args.seeds} seeds:")
        print(format_report(verdicts(measured)))
    if args.compare_scale:
        rho = rank_agreement(runs[args.budget_scale], runs[args.compare_scale])
        print(f"\nSpearman rank correlation of the panel, {args.budget_scale:g}x vs "
              f"{args.compare_scale:g}x budget:")
        for task, value in sorted(rho.items()):
            print(f"  {task}: {value:.2f}")
    print(f"stored in {url} (table hl_calibration)")
    return 0


class _VersionAction(argparse.Action):
    """``--version``: the release and the code it runs; git is asked only when the flag is given."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"hybridlab {__version__} (code {code_version()})")
        parser.exit()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": inspect,
    "train": train_command,
    "search": search_command,
    "status": status_command,
    "export": export_command,
    "import": import_command,
    "dashboard": dashboard_command,
    "eval": eval_command,
    "scale": scale_command,
    "promote": promote_command,
    "calibrate": calibrate_command,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlab", description=__doc__)
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version and the code's git commit, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    p.add_argument("config", nargs="?", default="tiny-hybrid",
                   help="architecture file or preset name (default: tiny-hybrid)")
    p.add_argument("--contexts", type=_context_list, default=[1024, 8192, 131072],
                   help="comma-separated context lengths for the cost table")
    p.add_argument("--batch", type=_at_least_one, default=4,
                   help="sequences per forward pass for the throughput measurement")
    p.add_argument("--seqlen", type=_at_least_one, default=256,
                   help="tokens per sequence for the throughput measurement")
    p.add_argument("--generate", type=_at_least_one, default=16, help="tokens to decode")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the throughput input and the decoded prompt")

    t = sub.add_parser("train", help=train_command.__doc__, description=train_command.__doc__)
    t.add_argument("arch", help="architecture file or preset name")
    t.add_argument("--task", required=True,
                   help="mqar | mad:<task> | state:<task> | corpus | "
                        "corpus:<path to text, folder or JSONL>")
    t.add_argument("--steps", type=int, help="training steps (overrides the train config)")
    t.add_argument("--config", help="YAML file of train settings (see hybridlab.train.TrainConfig)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one train setting, e.g. --set lr=0.003")
    t.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task knob, e.g. --task-option num_kv_pairs=8")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the data and the training order")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--device", help="cpu | cuda | cuda:N")
    t.add_argument("--out", help="checkpoint folder (default: runs/train/<arch>-<task>-<settings>)")

    s = sub.add_parser("search", help=search_command.__doc__, description=search_command.__doc__)
    s.add_argument("space", help="search-space YAML file (see search_spaces/)")
    s.add_argument("--study", help="study name (default: the space's name); reuse it to resume")
    s.add_argument("--storage", help="database URL (default: sqlite:///runs/<study>.db)")
    s.add_argument("--workers", type=_at_least_one, help="Ray workers (default: the space's)")
    s.add_argument("--trials", type=_at_least_one,
                   help="finished trials to reach (default: the space's)")
    s.add_argument("--ray-address", help="an existing Ray cluster (default: start one locally)")
    s.add_argument("--runs-dir", default="runs", help="outputs: databases, checkpoints")
    s.add_argument("--heartbeat-interval", type=_at_least_one, default=10,
                   help="seconds between a running trial's heartbeats")
    s.add_argument("--grace-period", type=_at_least_one, default=30,
                   help="seconds without a heartbeat before a trial counts as dead and is retried")
    s.add_argument("--progress-every", type=_at_least_one, default=30,
                   help="seconds between lines showing each running trial's task, step, train "
                        "loss and latest test metric (also written to <runs-dir>/<study>/"
                        "search.log)")
    s.add_argument("--allow-space-change", action="store_true",
                   help="continue an existing study although its search space changed")

    st = sub.add_parser("status", help=status_command.__doc__, description=status_command.__doc__)
    st.add_argument("--study", help="study name (default: the only study in the database)")
    st.add_argument("--storage", help="database URL (default: <runs-dir>/<study>.db; without "
                    "--study either, the only study database in --runs-dir)")
    st.add_argument("--runs-dir", default="runs",
                    help="where the default databases <runs-dir>/<study>.db live")

    pr = sub.add_parser("promote", help=promote_command.__doc__,
                        description=promote_command.__doc__)
    pr.add_argument("--study", help="study name (default: the only study in the database)")
    pr.add_argument("--storage", help="database URL (default: sqlite:///<runs-dir>/<study>.db)")
    pr.add_argument("--runs-dir", default="runs", help="databases and checkpoints")
    pr.add_argument("--space", help="a space file whose promotion section to run (default: the "
                    "space the study was created with)")
    pr.add_argument("--ray-address", help="an existing Ray cluster (default: start one locally)")

    ca = sub.add_parser("calibrate", help=calibrate_command.__doc__,
                        description=calibrate_command.__doc__)
    ca.add_argument("space", metavar="SPACE.yaml")
    ca.add_argument("--seeds", type=_at_least_one, default=3, help="seeds per reference")
    ca.add_argument("--references", default="transformer,mamba1,mamba2,hybrid",
                    help="comma-separated panel (default: all four)")
    ca.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply the space's train steps (default 1)")
    ca.add_argument("--compare-scale", type=float,
                    help="also train at this multiple of the steps and report how the panel's "
                         "ranking correlates (Spearman) between the two budgets, e.g. 4")
    ca.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    ca.add_argument("--storage", help="database URL (default: sqlite:///<runs-dir>/<space>.db)")
    ca.add_argument("--runs-dir", default="runs", help="where the default database lives")

    e = sub.add_parser("export", help=export_command.__doc__, description=export_command.__doc__)
    add_export_arguments(e)

    im = sub.add_parser("import", help=import_command.__doc__,
                        description=import_command.__doc__)
    im.add_argument("source", metavar="SOURCE",
                    help="a config.json, megatron_args.json or Megatron argument file, an export "
                         "or model folder, or a shipped layout: "
                         + ", ".join(published_names()))
    im.add_argument("--out", required=True, help="architecture file to write (YAML, or JSON "
                    "for .json)")
    im.add_argument("--format", choices=(*IMPORT_FORMATS, "hf"),
                    help="the source's format (default: read from the file); hf: any "
                         "transformers family, told by model_type")
    im.add_argument("--lossy", action="store_true",
                    help="when hybridlab cannot build the source as it is, import the closest "
                         "architecture and list every change")
    im.add_argument("--scale-to", metavar="TARGET",
                    help="extrapolate the import to TARGET parameters (1.3B, 4x; see "
                         "hybridlab.scale)")
    im.add_argument("--strategy", choices=STRATEGIES,
                    help="with --scale-to: stack, stretch or both (default)")
    im.add_argument("--scale-d-state", action="store_true",
                    help="with --scale-to: grow the SSM state size with d_model")

    d = sub.add_parser("dashboard", help=dashboard_command.__doc__,
                       description=dashboard_command.__doc__)
    add_dashboard_arguments(d)

    ev = sub.add_parser("eval", help=eval_command.__doc__, description=eval_command.__doc__)
    add_eval_arguments(ev)

    sc = sub.add_parser("scale", help=scale_command.__doc__, description=scale_command.__doc__)
    sc.add_argument("arch", nargs="?", help="architecture file or preset name (or use --best / "
                    "--trial with --study)")
    which = sc.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true",
                       help="start from the study's best trial (single objective only)")
    which.add_argument("--trial", type=int, metavar="N", help="start from trial N of the study")
    sc.add_argument("--study", help="study name (default: the only study in the database)")
    sc.add_argument("--storage", help="database URL (default: sqlite:///<runs-dir>/<study>.db)")
    sc.add_argument("--runs-dir", default="runs", help="where the default database lives")
    sc.add_argument("--to", required=True, metavar="TARGET",
                    help="parameters (1.3B, 350M, 125k) or a ratio of the source's (4x)")
    sc.add_argument("--strategy", default="both", choices=STRATEGIES,
                    help="stack: repeat the layer unit; stretch: widen every layer; both "
                         "(default): width and depth together (see hybridlab.scale)")
    sc.add_argument("--context", type=int, default=4096,
                    help="context length of the reported FLOPs/token and inference state")
    sc.add_argument("--scale-d-state", action="store_true",
                    help="grow the SSM state size with d_model (default: keep it)")
    sc.add_argument("--out", default="arch.yaml", help="where to write the scaled architecture")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HybridlabError as err:
        # An interrupted search says so and exits 128 + the signal; other user errors exit 2.
        code = getattr(err, "exit_code", 2)
        label = "error: " if code == 2 else ""
        print(f"hybridlab {args.command}: {label}{err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        # Ctrl-C outside a search's own handling (set-up, other commands): a line, not a trace.
        print(f"hybridlab {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
