"""Exporting a study's trials extrapolated to a larger size: configs only, labelled untrained."""

import argparse
import json
import re

import pytest
import torch

from hybridlab.cli import main
from hybridlab.config import ArchConfig, AttentionSpec, Mamba2Spec, MLPSpec
from hybridlab.cost import param_count
from hybridlab.export import add_export_arguments, export_command, load_hybridlab
from hybridlab.export.common import ExportError, verify_export
from hybridlab.export.study import export_scaled
from hybridlab.model import HybridLM
from hybridlab.scale import ScaleError, Target, scale

# One setting per layer kind, so mamba_ssm, Megatron and both HF flavours can take it.
ARCH = ArchConfig.from_pattern(
    "M-M-*-", d_model=64, vocab_size=64,
    mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
    attention=AttentionSpec(n_heads=4, n_kv_heads=2), mlp=MLPSpec(multiplier=2.0),
)
OTHER = ArchConfig.from_pattern("MM*", d_model=32, vocab_size=64,
                                mamba2=Mamba2Spec(d_state=8, headdim=16),
                                attention=AttentionSpec(n_heads=2))
# NemotronH takes single-kind layers without RoPE (and without a gated MLP).
NO_ROPE = ArchConfig.from_pattern(
    "MM*M", d_model=64, vocab_size=64, mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
    attention=AttentionSpec(n_heads=4, n_kv_heads=1, rope=False),
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridlab export")
    add_export_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def study(make_study, row):
    """Trial 1 (ARCH) is the best of OTHER, ARCH and NO_ROPE; none has a checkpoint."""
    return make_study([row([0.4], arch=OTHER), row([0.9], arch=ARCH), row([0.5], arch=NO_ROPE)],
                      directions=["maximize"])


def test_best_trial_exports_its_scaled_config_labelled_untrained(study, tmp_path):
    out = tmp_path / "scaled"
    done = export_scaled("s", storage=study, selection="best", target=Target(ratio=4.0),
                         fmt="hybridlab", out=out)
    assert done.description.startswith("best trial 1 (maximize accuracy = 0.9)")
    assert "extrapolated by both to 4x params" in done.description
    (result,) = done.exports
    assert result.weights is None and result.folder == out
    expected = scale(ARCH, Target(ratio=4.0))
    loaded = ArchConfig.load(out / "arch.yaml")
    assert loaded == expected.config
    manifest = verify_export(out)
    assert manifest["weights"] is None
    assert manifest["untrained"].startswith("extrapolated from trial 1 of study `s`")
    assert manifest["architecture"]["params"] == param_count(expected.config)
    assert not [p for p in out.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    card = (out / "README.md").read_text()
    for text in ("**Untrained**: extrapolated from trial 1 of study `s` (pattern M-M-*-",
                 "proxy accuracy = 0.9", "by both to 4x params; no weights",
                 f"{param_count(expected.config):,}", "## Extrapolation",
                 expected.report(), "none (untrained", "HybridLM(ArchConfig.load("):
        assert text in card, text
    # It loads as an architecture to train from scratch, and says so when asked for weights.
    tokens = torch.randint(64, (1, 9), generator=torch.Generator().manual_seed(0))
    assert HybridLM(loaded)(tokens).shape == (1, 9, 64)
    with pytest.raises(ExportError, match=r"untrained export .* has no weights"):
        load_hybridlab(out)


@pytest.mark.parametrize(("fmt", "trial", "config_file", "check"), [
    ("mamba_ssm", 1, "config.json",
     lambda data, arch: data["d_model"] == arch.d_model and data["n_layer"] == arch.pattern.count(
         "M") + arch.pattern.count("*")),
    ("megatron", 1, "megatron_args.json",
     lambda data, arch: data["hybrid_override_pattern"] == arch.pattern
     and data["arguments"]["--hidden-size"] == arch.d_model),
    ("hf", 2, "config.json",
     lambda data, arch: data["hidden_size"] == arch.d_model
     and len(data["layers_block_type"]) == arch.n_layers),
])
def test_every_format_takes_the_scaled_config_without_weights(study, tmp_path, fmt, trial,
                                                              config_file, check):
    out = tmp_path / fmt
    done = export_scaled("s", storage=study, selection=trial, target=Target(params=3_000_000),
                         fmt=fmt, out=out, strategy="stack")
    (result,) = done.exports
    assert result.faithful and result.weights is None
    source = {1: ARCH, 2: NO_ROPE}[trial]
    arch = scale(source, Target(params=3_000_000), strategy="stack").config
    assert ArchConfig.load(out / "arch.yaml") == arch
    assert check(json.loads((out / config_file).read_text()), arch)
    assert not [p for p in out.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    manifest = verify_export(out)
    assert manifest["weights"] is None and "by stack to 3M params" in manifest["untrained"]
    assert "**Untrained**" in (out / "README.md").read_text()


def test_a_billion_parameter_target_is_written_without_building_it(study, tmp_path):
    out = tmp_path / "big"
    export_scaled("s", storage=study, selection=1, target=Target(params=1_300_000_000),
                  fmt="megatron", out=out)
    arch = ArchConfig.load(out / "arch.yaml")
    assert abs(param_count(arch) / 1.3e9 - 1) <= 0.05
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["architecture"]["params"] == param_count(arch)


def test_pareto_trials_get_a_folder_each_and_one_genome_is_exported_once(make_study, row,
                                                                         tmp_path):
    url = make_study([row([0.5, 100], arch=OTHER), row([0.9, 300], arch=ARCH),
                      row([0.5, 100], arch=OTHER)], directions=["maximize", "minimize"])
    out = tmp_path / "front"
    done = export_scaled("s", storage=url, selection="pareto", target=Target(ratio=4.0),
                         fmt="hybridlab", out=out)
    assert [r.folder.name for r in done.exports] == ["trial_0000", "trial_0001"]
    assert done.skipped == ("trial 2: the same architecture as trial 0, exported once",)
    index = json.loads((out / "selection.json").read_text())
    assert index["untrained"] is True and [t["trial"] for t in index["trials"]] == [0, 1]
    for number, source in ((0, OTHER), (1, ARCH)):
        folder = out / f"trial_{number:04d}"
        assert ArchConfig.load(folder / "arch.yaml") == scale(source, Target(ratio=4.0)).config
        assert verify_export(folder)["untrained"].startswith(f"extrapolated from trial {number}")


def test_export_command_scales_and_refuses_bad_flags_without_writing(study, tmp_path, capsys):
    out = tmp_path / "cmd"
    args = ["--storage", study, "--trial", "1", "--format", "hybridlab"]
    assert export_command(parse(*args, "--out", str(out), "--scale-to", "4x",
                                "--strategy", "both")) == 0
    printed = capsys.readouterr().out
    assert "extrapolated by both to 4x params" in printed and "weights: none (untrained)" in printed
    assert ArchConfig.load(out / "arch.yaml") == scale(ARCH, Target(ratio=4.0)).config
    for bad, flag, message in [
        (["--scale-to", "huge"], "--scale-to", "cannot read 'huge'"),
        (["--scale-to", "0.5x"], "--scale-to", "trial 1: 0.5x params .* below the source"),
        (["--scale-to", "1.6x", "--strategy", "stack"], "--scale-to", "nearest it reaches"),
        (["--strategy", "stack"], "--strategy", "applies only with --scale-to"),
        (["--scale-to", "4x", "--task", "mqar"], "--task", "no checkpoint"),
    ]:
        target = tmp_path / "refused"
        assert export_command(parse(*args, "--out", str(target), *bad)) == 2
        err = capsys.readouterr().err
        assert f"error: {flag}: " in err
        assert re.search(message, err), err
        assert not target.exists()


def test_scale_command_reads_a_trials_architecture(study, tmp_path, capsys):
    out = tmp_path / "arch.yaml"
    assert main(["scale", "--storage", study, "--best", "--to", "1.3B", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best trial 1 (maximize accuracy = 0.9) of study 's'" in printed
    assert ArchConfig.load(out) == scale(ARCH, Target(params=1_300_000_000)).config
    out.unlink()
    assert main(["scale", "--storage", study, "--trial", "0", "--to", "2x", "--strategy",
                 "stretch", "--out", str(out)]) == 0
    assert ArchConfig.load(out) == scale(OTHER, Target(ratio=2.0), strategy="stretch").config


def test_scale_command_refuses_a_multi_objective_best_and_a_trial_without_arch(
    make_study, row, tmp_path, capsys
):
    url = make_study([row([0.5, 100], arch=OTHER), row([0.9, 300], arch=ARCH),
                      row([0.1, 50], status="pruned")], directions=["maximize", "minimize"])
    out = tmp_path / "arch.yaml"
    assert main(["scale", "--storage", url, "--best", "--to", "4x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --best: " in err and "choose one of trials 0, 1 with --trial N" in err
    assert main(["scale", "--storage", url, "--trial", "2", "--to", "4x", "--out",
                 str(out)]) == 2
    assert "trial 2 of study 's' has no recorded architecture" in capsys.readouterr().err
    assert main(["scale", "--storage", url, "--trial", "7", "--to", "4x", "--out",
                 str(out)]) == 2
    assert "has no trial 7" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ScaleError):
        export_scaled("s", storage=url, selection=1, target=Target(ratio=0.5),
                      fmt="hybridlab", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
