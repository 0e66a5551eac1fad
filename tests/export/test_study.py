"""Exporting from a study database: selection, verified weights, reuse, refusals, the command."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

from hybridlab.checkpoint import save_checkpoint
from hybridlab.config import ArchConfig, Mamba1Spec, Mamba2Spec
from hybridlab.export import add_export_arguments, export_command, load_hybridlab
from hybridlab.export.common import ExportError, ExportRefused, sha256_file
from hybridlab.export.study import export_study
from hybridlab.model import HybridLM
from hybridlab.store import Artifact, StorageError, make_engine, session_scope


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridlab export")
    add_export_arguments(parser)
    return parser.parse_args(argv)


def test_best_trial_exports_with_its_trained_weights_and_model_card(
    trained, make_study, row, tmp_path, logits
):
    model, checkpoint, fingerprint = trained
    other = HybridLM(ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)))
    url = make_study([row([0.4], arch=other.config),
                      row([0.9], arch=model.config, checkpoint=checkpoint,
                          fingerprint=fingerprint)], directions=["maximize"])
    done = export_study("s", storage=url, selection="best", fmt="hybridlab",
                        out=tmp_path / "best")
    assert done.description == "best trial 1 (maximize accuracy = 0.9)"
    (result,) = done.exports
    assert result.folder == tmp_path / "best"
    rebuilt = load_hybridlab(tmp_path / "best")
    assert torch.equal(logits(rebuilt), logits(model))
    card = (tmp_path / "best" / "README.md").read_text()
    for text in ("M-M-*-", "study `s`, trial 1", "| accuracy | maximize | 0.9 |",
                 f"{sum(p.numel() for p in model.parameters()):,}", "FLOPs/token",
                 "inference state", json.dumps(fingerprint, sort_keys=True), "corpus hash",
                 "hybridlab 0.1.0+test", "step 4", "| mqar | accuracy | 0.9 |"):
        assert text in card, text
    manifest = json.loads((tmp_path / "best" / "export.json").read_text())
    assert manifest["source"]["trial"] == manifest["source"]["weights_trial"] == 1
    assert manifest["source"]["checkpoint"] == str(checkpoint)


def test_multi_objective_best_is_the_pareto_set_and_reuse_is_exported_once(
    make_study, row, checkpoint_of, tmp_path, logits
):
    small = HybridLM(ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)), seed=1)
    big = HybridLM(ArchConfig.from_pattern("MM", d_model=32, vocab_size=64,
                                           mamba2=Mamba2Spec(d_state=8, headdim=16)), seed=2)
    url = make_study([
        row([0.5, 100], arch=small.config, checkpoint=checkpoint_of(small)),
        row([0.9, 300], arch=big.config, checkpoint=checkpoint_of(big)),
        row([0.4, 400], arch=big.config, checkpoint=checkpoint_of(big)),  # dominated
        row([0.5, 100], arch=small.config, status="reused", reused_from=0),
    ], directions=["maximize", "minimize"])
    for selection in ("best", "pareto"):
        out = tmp_path / selection
        done = export_study("s", storage=url, selection=selection, fmt="hybridlab", out=out)
        assert "Pareto-optimal" in done.description and "0, 1, 3" in done.description
        if selection == "best":
            assert "--best on a study with 2 objectives" in done.description
        assert [r.folder.name for r in done.exports] == ["trial_0000", "trial_0001"]
        assert done.skipped == ("trial 3: the same weights as trial 0 (trained by trial 0), "
                                "exported once",)
        index = json.loads((out / "selection.json").read_text())
        assert [t["trial"] for t in index["trials"]] == [0, 1]
        assert torch.equal(logits(load_hybridlab(out / "trial_0001")), logits(big))


def test_reused_trial_takes_the_weights_of_the_original(make_study, row, checkpoint_of,
                                                        tmp_path, logits):
    model = HybridLM(ArchConfig.from_pattern("M*", d_model=32, vocab_size=64,
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)), seed=5)
    url = make_study([row([0.7], arch=model.config, checkpoint=checkpoint_of(model)),
                      row([0.7], arch=model.config, status="reused", reused_from=0)],
                     directions=["maximize"])
    done = export_study("s", storage=url, selection=1, fmt="hybridlab", out=tmp_path / "out")
    assert torch.equal(logits(load_hybridlab(done.out)), logits(model))
    assert "weights were trained by trial 0" in (done.out / "README.md").read_text()


@pytest.mark.parametrize(("status", "message"), [
    ("pruned", "trial 0 was pruned (stopped at step 10): only trained"),
    ("rejected", "trial 0 was rejected (stopped at step 10): only trained"),
])
def test_trial_without_finished_weights_is_refused(make_study, row, tmp_path, status,
                                                   message):
    config = ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                     mamba2=Mamba2Spec(d_state=8, headdim=16))
    url = make_study([row([0.1], arch=config, status=status, reason="stopped at step 10")],
                     directions=["maximize"])
    with pytest.raises(ExportError, match=re.escape(message)):
        export_study("s", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_study_trial_and_checkpoint_are_named(make_study, row, tmp_path):
    config = ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                     mamba2=Mamba2Spec(d_state=8, headdim=16))
    url = make_study([row([0.3], arch=config)], directions=["maximize"])
    with pytest.raises(StorageError, match="no study 'nope'"):
        export_study("nope", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "a")
    with pytest.raises(ExportError, match="no trial 7"):
        export_study("s", storage=url, selection=7, fmt="hybridlab", out=tmp_path / "b")
    with pytest.raises(ExportError, match="trial 0 has no recorded checkpoint"):
        export_study("s", storage=url, selection="best", fmt="hybridlab", out=tmp_path / "c")


def test_tampered_checkpoint_is_refused(make_study, row, checkpoint_of, tmp_path):
    model = HybridLM(ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)))
    checkpoint = checkpoint_of(model)
    url = make_study([row([0.3], arch=model.config, checkpoint=checkpoint)],
                     directions=["maximize"])
    state = checkpoint / "train_state.pt"
    state.write_bytes(state.read_bytes() + b"x")
    with pytest.raises(ExportError, match=r"train_state\.pt is corrupted"):
        export_study("s", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "a")
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="modified after training"):
        export_study("s", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_one_refused_trial_leaves_no_half_written_pareto_export(make_study, row,
                                                               checkpoint_of, tmp_path):
    fits = HybridLM(ArchConfig.from_pattern("MM", d_model=32, vocab_size=64,
                                            mamba2=Mamba2Spec(d_state=8, headdim=16)))
    mixed = HybridLM(ArchConfig.from_pattern("mM", d_model=32, vocab_size=64,
                                             mamba1=Mamba1Spec(d_state=4),
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)))
    url = make_study([row([0.9, 300], arch=fits.config, checkpoint=checkpoint_of(fits)),
                      row([0.5, 100], arch=mixed.config, checkpoint=checkpoint_of(mixed))],
                     directions=["maximize", "minimize"])
    with pytest.raises(ExportRefused, match=r"layers\[0\] = mamba1"):
        export_study("s", storage=url, selection="pareto", fmt="mamba_ssm", out=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.tmp")]


def test_export_command_prints_changes_and_errors(make_study, row, checkpoint_of, tmp_path,
                                                  capsys):
    mixed = HybridLM(ArchConfig.from_pattern("mM", d_model=32, vocab_size=64,
                                             mamba1=Mamba1Spec(d_state=4),
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)))
    url = make_study([row([0.5], arch=mixed.config, checkpoint=checkpoint_of(mixed))],
                     directions=["maximize"])
    common = ("--study", "s", "--storage", url, "--best", "--format", "megatron")
    assert export_command(parse(*common, "--out", str(tmp_path / "a"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridlab export: error: format 'megatron' cannot represent")
    assert "layers[0] = mamba1" in err and not (tmp_path / "a").exists()

    assert export_command(parse(*common, "--out", str(tmp_path / "b"), "--lossy")) == 0
    out = capsys.readouterr().out
    assert "selected best trial 0" in out and "megatron, LOSSY, 1 changes" in out
    assert "changed layers[0]: mamba1(" in out and "Megatron has no Mamba-1 layer" in out
    assert (tmp_path / "b" / "LOSSY.md").is_file()
    with pytest.raises(SystemExit):
        parse("--study", "s", "--format", "hf", "--out", "x")  # no --best/--pareto/--trial


@pytest.mark.slow
def test_export_after_a_real_search(tmp_path, logits):
    from hybridlab.search.runner import run_search

    space = Path(__file__).parents[1] / "search" / "tiny_space.yaml"
    summary = run_search(space, runs_dir=tmp_path / "runs", echo=lambda line: None,
                         heartbeat_interval=1, grace_period=4)
    done = export_study("tiny", storage=summary.storage_url, selection="best",
                        fmt="hybridlab", out=tmp_path / "best")
    (result,) = done.exports
    manifest = json.loads((result.folder / "export.json").read_text())
    checkpoint = Path(manifest["source"]["checkpoint"])
    trained = HybridLM(ArchConfig.load(result.folder / "arch.yaml"))
    load_model(trained, str(checkpoint / "model.safetensors"))
    assert torch.equal(logits(load_hybridlab(result.folder)), logits(trained))
    pareto = export_study("tiny", storage=summary.storage_url, selection="pareto",
                          fmt="hybridlab", out=tmp_path / "pareto")
    assert (tmp_path / "pareto" / "selection.json").is_file() and pareto.exports



def test_suite_trial_needs_task_to_pick_a_checkpoint(make_study, row, checkpoint_of, tmp_path,
                                                     logits):
    model = HybridLM(ArchConfig.from_pattern("M", d_model=32, vocab_size=64,
                                             mamba2=Mamba2Spec(d_state=8, headdim=16)))
    url = make_study([row([0.3], arch=model.config, checkpoint=checkpoint_of(model))],
                     directions=["maximize"])
    other = HybridLM(model.config, seed=9)
    second = save_checkpoint(tmp_path / "other-task", 1, model=other, train_state={})
    engine = make_engine(url)
    with session_scope(engine) as session:
        session.add(Artifact(study="s", trial=0, kind="checkpoint:mad:compression",
                             path=str(second), sha256=sha256_file(second / "model.safetensors")))
    engine.dispose()
    with pytest.raises(ExportError, match="one checkpoint per task"):
        export_study("s", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "a")
    done = export_study("s", storage=url, selection=0, fmt="hybridlab", out=tmp_path / "b",
                        task="mad:compression")
    assert torch.equal(logits(load_hybridlab(done.out)), logits(other))
