"""What every export format shares: errors, the record of what a format changed, atomic folders.

A format either represents an architecture faithfully or it does not. When it does not, each
difference is a :class:`Change` naming the layer and field, what hybridlab has, what the format
would get instead, and why; the export is refused with those reasons, or written with ``lossy``
and the changes listed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    LayerSpec,
    Mamba1Spec,
    Mamba2Spec,
    MLPSpec,
)
from hybridlab.errors import HybridlabError
from hybridlab.files import sha256_file
from hybridlab.layers import layer_type

SSM_TYPES = ("mamba1", "mamba2")
MANIFEST_FILE = "export.json"


class ExportError(HybridlabError, RuntimeError):
    """An export cannot be done as asked; names the format, trial, layer or file and why."""


@dataclass(frozen=True, kw_only=True)
class Change:
    """One thing a format cannot represent, and what a lossy export writes instead."""

    where: str
    was: str
    now: str
    reason: str

    def refusal(self) -> str:
        return f"{self.where} = {self.was}: {self.reason}"

    def describe(self) -> str:
        return f"{self.where}: {self.was} -> {self.now} ({self.reason})"

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "was": self.was, "now": self.now, "reason": self.reason}


class ExportRefused(ExportError):
    """The format cannot represent the architecture; lists every reason, per flavour."""

    def __init__(self, fmt: str, sections: Mapping[str, Sequence[Change]]) -> None:
        self.format = fmt
        self.sections = {name: tuple(changes) for name, changes in sections.items()}
        lines = [f"format {fmt!r} cannot represent this architecture faithfully:"]
        for name, changes in self.sections.items():
            indent = "  "
            if len(self.sections) > 1:
                lines.append(f"  as {name}:")
                indent = "    "
            lines += [f"{indent}- {change.refusal()}" for change in changes]
        lines.append(f"--lossy writes the closest {fmt} config without weights and lists "
                     "these changes in LOSSY.md")
        super().__init__("\n".join(lines))


@dataclass(frozen=True, kw_only=True)
class Fit:
    """How an architecture maps onto a format.

    ``changes`` alter what the model computes (a faithful fit has none); ``notes`` are
    function-preserving adjustments and conventions a user of the files should know.
    """

    changes: tuple[Change, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def faithful(self) -> bool:
        return not self.changes


def describe(spec: LayerSpec, d_model: int) -> str:
    """``mamba2(d_state=64, headdim=64, ...)``: a layer's type and its semantic settings."""
    settings = ", ".join(f"{k}={v}" for k, v in spec.semantics(d_model).items())
    return f"{spec.type}({settings})"


def drop_refused_layers(arch: ArchConfig, fmt: str) -> tuple[ArchConfig, list[Change]]:
    """``arch`` without the layers whose type ``fmt`` cannot hold (the registry says why), and
    one Change per such layer; the format's own fitting then numbers the remaining layers."""
    changes = [
        Change(where=f"layers[{i}]", was=describe(spec, arch.d_model),
               now="removed (later changes number the layers without it)", reason=why)
        for i, spec in enumerate(arch.layers)
        if (why := layer_type(spec).refusal(fmt)) is not None
    ]
    if not changes:
        return arch, []
    kept = tuple(s for s in arch.layers if layer_type(s).refusal(fmt) is None)
    if not kept:
        raise ExportError(f"format {fmt!r} can hold none of the layers of {arch.pattern!r}: "
                          + "; ".join(c.refusal() for c in changes))
    return replace(arch, layers=kept), changes


def unify(
    specs: Mapping[int, LayerSpec], d_model: int, *, reason: str
) -> tuple[LayerSpec, list[Change]]:
    """The most common setting among ``specs`` (layer index -> spec; the first seen wins a tie)
    and one Change for each field of each layer that differs from it."""
    groups: dict[str, list[int]] = {}
    for index, spec in specs.items():
        groups.setdefault(describe(spec, d_model), []).append(index)
    # max() keeps the first of equal counts, and dicts keep insertion order: first seen wins.
    chosen = specs[max(groups.values(), key=len)[0]]
    target = chosen.semantics(d_model)
    changes = []
    for index, spec in specs.items():
        have = spec.semantics(d_model)
        # rope_theta exists only with rope: compare over both key sets, a missing key as "-".
        for key in dict.fromkeys([*have, *target]):
            if have.get(key, "-") != target.get(key, "-"):
                changes.append(Change(where=f"layers[{index}].{key}", was=str(have.get(key, "-")),
                                      now=str(target.get(key, "-")), reason=reason))
    return chosen, changes


def chunk_size_note(specs: Sequence[LayerSpec], chosen: Mamba2Spec) -> list[str]:
    """A note when Mamba-2 layers differ in ``chunk_size``, which a one-setting format drops."""
    sizes = sorted({s.chunk_size for s in specs if isinstance(s, Mamba2Spec)})
    if len(sizes) <= 1:
        return []
    return [f"Mamba-2 chunk_size differs between layers ({sizes}); wrote {chosen.chunk_size}. "
            "The chunk size only tiles the scan: outputs are the same up to rounding."]


@dataclass(frozen=True)
class Pairing:
    """Layers grouped the way mamba_ssm and Bamba build blocks: one mixer, then at most one MLP."""

    blocks: tuple[tuple[int, int | None], ...]
    stray_mlps: tuple[int, ...]


def pair_blocks(arch: ArchConfig) -> Pairing:
    """(mixer index, index of the MLP right after it or None) per block; MLPs that follow no
    mixer directly (a leading MLP, a second MLP in a row) are stray."""
    blocks: list[tuple[int, int | None]] = []
    stray: list[int] = []
    for i, spec in enumerate(arch.layers):
        if layer_type(spec).mixes_sequence:
            blocks.append((i, None))
        elif blocks and blocks[-1] == (i - 1, None):
            blocks[-1] = (i - 1, i)
        else:
            stray.append(i)
    return Pairing(blocks=tuple(blocks), stray_mlps=tuple(stray))


def mlp_spec_of_width(width: int, d_model: int) -> MLPSpec:
    """An MLPSpec whose ``d_hidden(d_model)`` is exactly ``width``."""
    multiplier = width / d_model
    # width / d * d can round to just above width, and ceil() would then add one.
    while math.ceil(multiplier * d_model) > width:
        multiplier = math.nextafter(multiplier, 0.0)
    return MLPSpec(multiplier=multiplier, multiple_of=1)


def mamba2_from_mamba1(spec: Mamba1Spec, d_model: int) -> Mamba2Spec:
    """The Mamba-2 layer closest to a Mamba-1 one: same state, conv and expansion, one group,
    the widest head (of 64, 32, ... 1) that divides the inner width."""
    d_inner = spec.d_inner(d_model)
    headdim = next(h for h in (64, 32, 16, 8, 4, 2, 1) if d_inner % h == 0)
    return Mamba2Spec(d_state=spec.d_state, d_conv=spec.d_conv, expand=spec.expand,
                      headdim=headdim, ngroups=1)


def unify_ssm_as_mamba2(
    arch: ArchConfig, indices: Sequence[int], *, fmt: str, reason: str
) -> tuple[Mamba2Spec | None, list[Change], list[str]]:
    """One Mamba-2 setting for the SSM layers at ``indices`` of a format without Mamba-1.

    Mamba-1 layers become the common Mamba-2 setting (or, with no Mamba-2 layer to copy, the
    closest Mamba-2 to the most common Mamba-1 setting); each such layer is one Change.
    """
    d = arch.d_model
    m2 = {i: arch.layers[i] for i in indices if isinstance(arch.layers[i], Mamba2Spec)}
    m1 = {i: arch.layers[i] for i in indices if isinstance(arch.layers[i], Mamba1Spec)}
    changes: list[Change] = []
    if m2:
        chosen, changes = unify(m2, d, reason=reason)
    elif m1:
        common, _ = unify(m1, d, reason=reason)
        chosen = mamba2_from_mamba1(common, d)  # type: ignore[arg-type]
    else:
        return None, [], []
    for i, spec in m1.items():
        changes.append(Change(where=f"layers[{i}]", was=describe(spec, d),
                              now=describe(chosen, d),
                              reason=f"{fmt} has no Mamba-1 layer"))
    return chosen, changes, chunk_size_note(list(m2.values()), chosen)  # type: ignore[arg-type]


def unify_attention(
    arch: ArchConfig, indices: Sequence[int], *, reason: str, window_reason: str,
) -> tuple[AttentionSpec | None, list[Change]]:
    """One attention setting for the layers at ``indices``, after removing sliding windows (no
    format here has them; one Change each, saying ``window_reason``)."""
    specs: dict[int, LayerSpec] = {}
    changes: list[Change] = []
    for i in indices:
        spec = arch.layers[i]
        assert isinstance(spec, AttentionSpec)
        if spec.sliding_window is not None:
            changes.append(Change(where=f"layers[{i}].sliding_window",
                                  was=str(spec.sliding_window), now="None (full causal)",
                                  reason=window_reason))
            spec = replace(spec, sliding_window=None)
        specs[i] = spec
    if not specs:
        return None, changes
    chosen, unified = unify(specs, arch.d_model, reason=reason)
    return chosen, changes + unified  # type: ignore[return-value]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` that becomes ``out`` only on success.

    ``out`` must not exist (or be an empty folder); on any error the temporary folder is removed,
    so an export is either complete or absent.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose another --out or "
                          "remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (unlike mkdtemp's 0700) honours the umask, so the export reads like any new folder.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for file in tmp.rglob("*"):
            if file.is_file():
                # safetensors writes 0600 files; an export is meant to be shared like any file.
                file.chmod(mode)
                _fsync(file)
        if out.is_dir():
            # An empty folder the user made beforehand: rename needs the name free.
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_export(folder: str | Path) -> dict[str, Any]:
    """Check every file against export.json's sha256; return the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST_FILE}; not a hybridlab export")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{folder}: {name} is missing")
        if sha256_file(path) != expected:
            raise ExportError(f"{folder}: {name} does not match its sha256 in {MANIFEST_FILE}")
    return manifest
