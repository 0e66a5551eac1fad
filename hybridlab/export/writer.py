"""Write one model in one format into a folder: the format's files, arch.yaml, README.md (model
card), LOSSY.md when lossy, and export.json (the manifest with every file's sha256)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model

from hybridlab import code_version
from hybridlab.config import ArchConfig
from hybridlab.cost import param_count
from hybridlab.data.tokenizer import Tokenizer
from hybridlab.export import hf, mamba_ssm, megatron
from hybridlab.export.card import CardInput, Provenance, lossy_md, model_card
from hybridlab.export.common import (
    MANIFEST_FILE,
    Change,
    ExportError,
    ExportRefused,
    Fit,
    atomic_folder,
    drop_refused_layers,
    verify_export,
    write_json,
)
from hybridlab.export.tokenizer_files import hf_tokenizer_files
from hybridlab.files import sha256_file
from hybridlab.layers import LAYER_TYPES
from hybridlab.model import HybridLM

FORMATS = ("hybridlab", "mamba_ssm", "megatron", "hf")
# Per foreign format, the layer types its module maps; a registered type must be here or
# refused by that format in the registry (``check_layer_coverage``).
WRITES = {"mamba_ssm": mamba_ssm.WRITES, "megatron": megatron.WRITES, "hf": hf.WRITES}
DEFAULT_SEQ_LENGTH = 2048
ARCH_FILE = "arch.yaml"
WEIGHTS_FILE = "model.safetensors"
# Beside Megatron's arguments, hybridlab-named weights get a name no foreign loader picks up.
FOREIGN_WEIGHTS_FILE = "hybridlab_weights.safetensors"
CARD_FILE = "README.md"
LOSSY_FILE = "LOSSY.md"


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What one export wrote, and what (if anything) the format changed."""

    folder: Path
    format: str
    flavour: str | None
    changes: tuple[Change, ...]
    notes: tuple[str, ...]
    files: dict[str, str]
    weights: str | None

    @property
    def faithful(self) -> bool:
        return not self.changes


def _usage(fmt: str, flavour: str | None, weights: str | None) -> str:
    if fmt == "hybridlab" and weights is None:
        return ("```python\nfrom hybridlab.config import ArchConfig\nfrom hybridlab.model import "
                "HybridLM\n\nmodel = HybridLM(ArchConfig.load(\"<this folder>/arch.yaml\"))"
                "  # untrained: train from scratch\n```")
    if fmt == "hybridlab":
        return ("```python\nfrom hybridlab.export import load_hybridlab\n\n"
                "model = load_hybridlab(\"<this folder>\")  # verifies export.json's hashes\n```")
    if fmt == "mamba_ssm":
        if weights is None:
            return ("```python\nimport json\nfrom mamba_ssm.models.config_mamba import "
                    "MambaConfig\nfrom mamba_ssm.models.mixer_seq_simple import "
                    "MambaLMHeadModel\n\nconfig = MambaConfig(**json.load(open(\"config.json\")))"
                    "\nmodel = MambaLMHeadModel(config, device=\"cuda\")  # train from scratch"
                    "\n```")
        return ("```python\nfrom mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel\n\n"
                "model = MambaLMHeadModel.from_pretrained(\"<this folder>\", device=\"cuda\")\n"
                "# back to hybridlab: hybridlab.export.load_mamba_ssm(\"<this folder>\")\n```")
    if fmt == "megatron":
        return ("```bash\nsource megatron_args.sh\ntorchrun ... pretrain_mamba.py "
                "\"${MODEL_ARGS[@]}\" <tokenizer, data, parallelism, optimizer flags>\n```\n"
                "`--vocab-size` is the trained vocabulary; with a real tokenizer Megatron takes "
                "the vocabulary from it. `--seq-length` is the trained length.")
    if weights is None:
        return ("```python\nfrom transformers import AutoConfig, AutoModelForCausalLM\n\n"
                "config = AutoConfig.from_pretrained(\"<this folder>\")\n"
                "model = AutoModelForCausalLM.from_config(config)  # train from scratch\n```\n"
                f"Needs `{hf.REQUIREMENT}`.")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")  # if the folder has "
            "one\nids = tokenizer(\"Hello\", return_tensors=\"pt\").input_ids\n"
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))\n```\n"
            f"Needs `{hf.REQUIREMENT}`. Greedy decoding is the default "
            "(generation_config.json). A model without attention layers has `use_cache` "
            "false: transformers 5.x builds no cache for it, so each step reruns the sequence.")


def _save_weights(model: HybridLM, folder: Path, name: str) -> str:
    # save_model stores a tied head once and load_model restores the tie.
    save_model(model, str(folder / name))
    return name


def check_layer_coverage(fmt: str, types: set[str]) -> None:
    """Raise ExportError for a layer type that ``fmt`` neither maps nor refuses: a type added
    to the registry without deciding what each format does with it is never guessed at."""
    for name in sorted(types):
        mapped = name in WRITES[fmt]
        refused = LAYER_TYPES[name].refusal(fmt) is not None
        if mapped == refused:
            state = "both maps and refuses" if mapped else "neither maps nor refuses"
            raise ExportError(f"format {fmt!r} {state} layer type {name!r}: add it to "
                              f"hybridlab/export/{fmt}.py's WRITES or give its registry entry "
                              f"a refusal for {fmt!r}")


def _check(fmt: str, fitted: Fit, *, lossy: bool) -> None:
    if fitted.changes and not lossy:
        raise ExportRefused(fmt, {fmt: fitted.changes})


def write_export(
    model: HybridLM, fmt: str, folder: Path, *, lossy: bool = False,
    provenance: Provenance | None = None, tokenizer: Tokenizer | None = None,
    notes: Sequence[str] = (),
) -> ExportResult:
    """Write ``model`` in ``fmt`` into the existing empty ``folder`` (not atomic by itself);
    ``notes`` are the caller's, for the model card and manifest."""
    return _write(model.config, model, fmt, folder, lossy=lossy, provenance=provenance,
                  tokenizer=tokenizer, notes=notes)


def write_config_export(
    arch: ArchConfig, fmt: str, folder: Path, *, lossy: bool = False,
    provenance: Provenance | None = None, tokenizer: Tokenizer | None = None,
) -> ExportResult:
    """Write the architecture alone, no weights, in ``fmt`` into the existing empty ``folder``.

    Every format takes a config without weights (none of them needs weights to describe a
    model); no model is built, so this works for architectures too large to instantiate here.
    """
    return _write(arch, None, fmt, folder, lossy=lossy, provenance=provenance,
                  tokenizer=tokenizer, notes=())


def _write(
    arch: ArchConfig, model: HybridLM | None, fmt: str, folder: Path, *, lossy: bool,
    provenance: Provenance | None, tokenizer: Tokenizer | None, notes: Sequence[str],
) -> ExportResult:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if tokenizer is not None and tokenizer.vocab_size > arch.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {arch.vocab_size}")
    prov = provenance or Provenance()
    seq_length = prov.seq_length or DEFAULT_SEQ_LENGTH
    extra_notes = list(notes)
    if fmt in ("megatron", "hf") and prov.seq_length is None:
        extra_notes.append(f"no trained sequence length was recorded; wrote {seq_length}")
    flavour: str | None = None
    target: ArchConfig | None = None
    weights: str | None = None
    if fmt != "hybridlab":
        check_layer_coverage(fmt, {spec.type for spec in arch.layers})
    written, refused = (arch, []) if fmt == "hybridlab" else drop_refused_layers(arch, fmt)
    if refused:
        if not lossy:
            raise ExportRefused(fmt, {fmt: refused})
        # A lossy export carries no weights, so the formats fit the kept layers alone.
        model = None
    if fmt == "hybridlab":
        fitted = Fit()
        files = [] if model is None else [_save_weights(model, folder, WEIGHTS_FILE)]
        weights = None if model is None else "hybridlab"
    elif fmt == "mamba_ssm":
        ssm_fit = mamba_ssm.fit(written)
        _check(fmt, ssm_fit, lossy=lossy)
        fitted, target = ssm_fit, ssm_fit.target
        files = mamba_ssm.write(model, folder, ssm_fit)
        weights = "mamba_ssm" if fitted.faithful and model is not None else None
    elif fmt == "megatron":
        mega_fit = megatron.fit(written)
        _check(fmt, mega_fit, lossy=lossy)
        fitted, target = mega_fit, mega_fit.target
        files = megatron.write(folder, mega_fit, seq_length=seq_length)
    else:
        candidates = hf.fits(written, seq_length=seq_length,
                             eos_id=None if tokenizer is None else tokenizer.eot_id)
        hf_fit = hf.choose(candidates)
        if hf_fit.changes and not lossy:
            raise ExportRefused(fmt, {name: f.changes for name, f in candidates.items()})
        fitted, flavour = hf_fit, hf_fit.flavour
        files = hf.write(folder, hf_fit, arch, None if model is None else model.state_dict())
        weights = "transformers" if hf.WEIGHTS_FILE in files else None
    fitted = replace(fitted, changes=(*refused, *fitted.changes))
    if fmt == "megatron" and fitted.faithful and model is not None:
        files.append(_save_weights(model, folder, FOREIGN_WEIGHTS_FILE))
        weights = "hybridlab"
    if tokenizer is not None:
        for name, text in hf_tokenizer_files(tokenizer, model_max_length=seq_length).items():
            (folder / name).write_text(text, encoding="utf-8")
            files.append(name)

    arch.save(folder / ARCH_FILE)
    files.append(ARCH_FILE)
    if fitted.changes:
        (folder / LOSSY_FILE).write_text(lossy_md(fmt, flavour, arch, fitted.changes, target))
        files.append(LOSSY_FILE)
    all_notes = (*fitted.notes, *extra_notes)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    exported_by = f"hybridlab {code_version()}"
    params = param_count(arch) if model is None else sum(p.numel() for p in model.parameters())
    card = CardInput(
        arch=arch, params=params, fmt=fmt, flavour=flavour,
        files=files, weights=weights, changes=fitted.changes, notes=all_notes,
        usage=_usage(fmt, flavour, weights), created=created, exported_by=exported_by,
        provenance=prov,
    )
    (folder / CARD_FILE).write_text(model_card(card))
    files.append(CARD_FILE)
    hashes = {name: sha256_file(folder / name) for name in files}
    weights_file = {"hybridlab": WEIGHTS_FILE if fmt == "hybridlab" else FOREIGN_WEIGHTS_FILE,
                    "mamba_ssm": mamba_ssm.WEIGHTS_FILE, "transformers": hf.WEIGHTS_FILE,
                    None: None}[weights]
    manifest: dict[str, Any] = {
        "format": fmt, "flavour": flavour, "faithful": fitted.faithful,
        "weights": None if weights is None else {"file": weights_file, "naming": weights},
        "architecture": {"file": ARCH_FILE, "pattern": arch.pattern,
                         "genome_hash": arch.canonical_hash(), "params": card.params},
        "untrained": prov.untrained,
        "changes": [c.to_dict() for c in fitted.changes], "notes": list(all_notes),
        "source": prov.to_dict(), "created": created, "exported_by": exported_by,
        "files": hashes,
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return ExportResult(folder=folder, format=fmt, flavour=flavour, changes=fitted.changes,
                        notes=all_notes, files=hashes, weights=weights)


def export_model(
    model: HybridLM, fmt: str, out: str | Path, *, lossy: bool = False,
    provenance: Provenance | None = None, tokenizer: Tokenizer | None = None,
    notes: Sequence[str] = (),
) -> ExportResult:
    """Export ``model`` in ``fmt`` to the new folder ``out``: complete, or not there at all.

    A format that cannot represent the architecture raises :class:`ExportRefused` naming each
    layer and field, unless ``lossy``: then the closest config is written without weights and the
    changes are listed in the result and in LOSSY.md. With the ``tokenizer`` of the task the
    model was trained on, the export carries it as files ``AutoTokenizer`` loads.
    """
    with atomic_folder(Path(out)) as tmp:
        result = write_export(model, fmt, tmp, lossy=lossy, provenance=provenance,
                              tokenizer=tokenizer, notes=notes)
    return replace(result, folder=Path(out))


def load_hybridlab(folder: str | Path, *, device: str = "cpu") -> HybridLM:
    """Rebuild the exported model from arch.yaml and the hybridlab-named weights of an export
    (hybridlab format, or a faithful megatron export), after verifying the hashes."""
    folder = Path(folder)
    manifest = verify_export(folder)
    weights = manifest.get("weights")
    if not weights and manifest.get("untrained"):
        raise ExportError(f"{folder}: an untrained export ({manifest['untrained']}) has no "
                          "weights; build it with HybridLM(ArchConfig.load(\"<folder>/arch.yaml"
                          "\"))")
    if not weights or weights["naming"] != "hybridlab":
        raise ExportError(f"{folder}: this {manifest['format']} export has no hybridlab-named "
                          "weights")
    model = HybridLM(ArchConfig.load(folder / ARCH_FILE))
    missing, unexpected = load_model(model, str(folder / weights["file"]), strict=False)
    if missing or unexpected:
        raise ExportError(f"{folder}: weights do not fit arch.yaml (missing {sorted(missing)[:5]}"
                          f", unexpected {sorted(unexpected)[:5]})")
    return model.to(device)
