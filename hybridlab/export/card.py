"""The model card (README.md) and LOSSY.md of an export, and the provenance they report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hybridlab.config import ArchConfig
from hybridlab.cost import flops_per_token, inference_state_bytes
from hybridlab.export.common import Change, describe

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class OptimizedValue:
    """One optimised objective of the study and this trial's value."""

    metric: str
    direction: str
    value: float


@dataclass(frozen=True)
class EvalRow:
    task: str
    metric: str
    value: float
    stderr: float | None
    harness: str


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where an exported model came from; all optional, for a model exported by hand."""

    study: str | None = None
    trial: int | None = None
    # The trial that trained the weights: differs from ``trial`` for a reused genome.
    weights_trial: int | None = None
    storage: str | None = None
    status: str | None = None
    optimized: tuple[OptimizedValue, ...] = ()
    objectives: dict[str, Any] = field(default_factory=dict)
    evaluations: tuple[EvalRow, ...] = ()
    task: str | None = None
    task_fingerprint: dict[str, Any] | None = None
    corpus_hash: str | None = None
    code_version: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_step: int | None = None
    state_context: int | None = None
    # Set for an extrapolated architecture exported without weights: the sentence that labels
    # it ("extrapolated from trial N by <strategy> to <target>; no weights") and the
    # source-vs-scaled table of hybridlab.scale.
    untrained: str | None = None
    scale_report: str | None = None

    @property
    def seq_length(self) -> int | None:
        """The trained sequence length, read from the task fingerprint (longest of a suite)."""
        if not self.task_fingerprint:
            return None
        prints = self.task_fingerprint.get("suite", [self.task_fingerprint])
        lengths = [p.get("seq_len", p.get("params", {}).get("seq_len")) for p in prints]
        lengths = [n for n in lengths if isinstance(n, int)]
        return max(lengths) if lengths else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study, "trial": self.trial, "weights_trial": self.weights_trial,
            "storage": self.storage, "status": self.status,
            "optimized": [vars(o) for o in self.optimized], "objectives": self.objectives,
            "task": self.task, "task_fingerprint": self.task_fingerprint,
            "corpus_hash": self.corpus_hash, "trained_with": self.code_version,
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_step": self.checkpoint_step, "untrained": self.untrained,
        }


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


@dataclass(frozen=True, kw_only=True)
class CardInput:
    """Everything the model card reports about one export."""

    arch: ArchConfig
    params: int
    fmt: str
    flavour: str | None
    files: Sequence[str]
    weights: str | None
    changes: Sequence[Change]
    notes: Sequence[str]
    usage: str
    created: str
    exported_by: str
    provenance: Provenance


_HF_CLASSES = {"nemotron_h": "NemotronHForCausalLM", "bamba": "BambaForCausalLM",
               "granitemoehybrid": "GraniteMoeHybridForCausalLM"}


def pattern_legend(arch: ArchConfig) -> str:
    """What each letter of the pattern stands for: "M mamba2, * attention, - mlp"."""
    return ", ".join(f"{symbol} {name}" for name, symbol in dict.fromkeys(
        (s.type, s.symbol) for s in arch.layers))


def front_matter(card: CardInput) -> list[str]:
    """The Hugging Face Hub's YAML header: library, pipeline and tags (no license is claimed:
    the user who trained the model chooses it)."""
    tags = ["hybridlab", "hybrid", *dict.fromkeys(s.type for s in card.arch.layers)]
    if card.flavour:
        tags.append(card.flavour)
    lines = ["---"]
    if card.fmt == "hf":
        lines.append("library_name: transformers")
    if card.weights is not None:
        lines.append("pipeline_tag: text-generation")
    lines += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]
    return lines


def model_card(card: CardInput) -> str:
    """README.md: what the model is, how it scored, where it came from, how to load the files."""
    arch, prov = card.arch, card.provenance
    context = prov.state_context or DEFAULT_CONTEXT
    kind = card.fmt + (f" ({card.flavour})" if card.flavour else "")
    lines = [*front_matter(card), f"# {arch.pattern} — hybridlab export, {kind} format", ""]
    if prov.study is not None:
        origin = f"study `{prov.study}`, trial {prov.trial}"
        if prov.weights_trial is not None and prov.weights_trial != prov.trial:
            origin += (f" (a reused genome: the weights were trained by trial "
                       f"{prov.weights_trial})")
        lines += [f"Exported {card.created} by {card.exported_by} from {origin}.", ""]
    else:
        lines += [f"Exported {card.created} by {card.exported_by}.", ""]
    if prov.untrained is not None:
        lines += [f"**Untrained**: {prov.untrained}. Train it from scratch.", ""]
    if card.changes:
        lines += ["**Lossy export**: the config here is the closest the format can express, not "
                  "the trained architecture, and no weights were written; see LOSSY.md.", ""]

    facts: list[tuple[str, Any]] = [
        ("pattern", f"`{arch.pattern}` ({pattern_legend(arch)})"),
        ("layers", f"{arch.n_layers} (d_model {arch.d_model}, vocabulary {arch.vocab_size}, "
                   f"{'tied' if arch.tie_embeddings else 'untied'} embeddings, "
                   f"norm eps {arch.norm_eps:g})"),
        ("parameters", f"{card.params:,}"),
        (f"FLOPs/token (forward, context {context})", f"{flops_per_token(arch, context):,.0f}"),
        (f"inference state (context {context}, bf16 cache, fp32 SSM state)",
         f"{inference_state_bytes(arch, context):,} bytes"),
        ("genome hash", f"`{arch.canonical_hash()}`"),
    ]
    if prov.task is not None:
        facts.append(("task", f"`{prov.task}`"))
    if prov.task_fingerprint is not None:
        facts.append(("task fingerprint",
                      f"`{json.dumps(prov.task_fingerprint, sort_keys=True)}`"))
    if prov.task is not None:
        facts.append(("corpus hash", f"`{prov.corpus_hash}`" if prov.corpus_hash
                      else "none (the task is synthetic)"))
    if prov.code_version is not None:
        facts.append(("trained with", f"hybridlab {prov.code_version}"))
    if prov.checkpoint is not None:
        facts.append(("checkpoint", f"step {prov.checkpoint_step}, `{prov.checkpoint}` "
                                    f"(model sha256 `{prov.checkpoint_sha256}`)"))
    if prov.storage is not None:
        facts.append(("study database", f"`{prov.storage}`"))
    lines += _table(["", "value"], facts)

    if prov.optimized:
        lines += ["## Objectives", ""]
        lines += _table(["metric", "direction", "value"],
                        [(o.metric, o.direction, o.value) for o in prov.optimized])
    if prov.objectives:
        lines += ["## Recorded metrics and costs", ""]
        lines += _table(["name", "value"], sorted(prov.objectives.items()))
    if prov.evaluations:
        lines += ["## Evaluations", ""]
        lines += _table(["task", "metric", "value", "stderr", "harness"],
                        [(e.task, e.metric, e.value, "-" if e.stderr is None else e.stderr,
                          e.harness) for e in prov.evaluations])

    if prov.scale_report is not None:
        lines += ["## Extrapolation", "", "```text", prov.scale_report, "```", ""]
    lines += ["## Layers", ""]
    lines += _table(["#", "layer"], [(i, f"`{describe(s, arch.d_model)}`")
                                     for i, s in enumerate(arch.layers)])
    lines += ["## Files", ""]
    lines += [f"- `{name}`" for name in card.files]
    lines += ["- `export.json`: this export's manifest (format, changes, sha256 of every file)",
              ""]
    unweighted = ("none (untrained: a config to train from scratch)" if prov.untrained
                  else "none (see LOSSY.md)" if card.changes else "none")
    weights = {None: unweighted,
               "hybridlab": "hybridlab's parameter names (`HybridLM.state_dict()`)",
               "mamba_ssm": "mamba_ssm's `MambaLMHeadModel` names",
               "transformers": f"transformers' `{_HF_CLASSES.get(card.flavour or '', '')}` "
                               "names"}[card.weights]
    lines += [f"Weights: {weights}.", ""]
    if card.notes:
        lines += ["## Format notes", ""] + [f"- {note}" for note in card.notes] + [""]
    lines += ["## Use", "", card.usage.strip(), ""]
    return "\n".join(lines)


def lossy_md(
    fmt: str, flavour: str | None, arch: ArchConfig, changes: Sequence[Change],
    target: ArchConfig | None,
) -> str:
    """LOSSY.md: exactly what a lossy export changed, one row per layer field."""
    kind = fmt + (f" ({flavour})" if flavour else "")
    lines = [
        f"# Lossy export: {kind}", "",
        f"{kind} cannot express the architecture in `arch.yaml` (pattern `{arch.pattern}`). The "
        "config in this folder is the closest it can express; it describes a different model, "
        "so no weights were exported (weights that only partly fit would load into a model "
        "that silently differs from the trained one). Train it from scratch, or export in "
        "hybridlab format to keep the trained model.", "",
        "## What changed", "",
    ]
    lines += _table(["where", "hybridlab", "written", "why"],
                    [(c.where, f"`{c.was}`", f"`{c.now}`", c.reason) for c in changes])
    if target is not None:
        lines += [f"## The written config as a hybridlab architecture (pattern "
                      f"`{target.pattern}`)", "", "```yaml", target.to_yaml().rstrip(), "```"]
    return "\n".join(lines) + "\n"
