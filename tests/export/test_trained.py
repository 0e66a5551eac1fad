"""``hybridlab export --checkpoint``: a ``hybridlab train`` folder, exported with its tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_model

from hybridlab.cli import main
from hybridlab.config import ArchConfig, Mamba2Spec
from hybridlab.model import HybridLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A Bamba-shaped stack trained 3 steps on the byte-level corpus by `hybridlab train`."""
    root = tmp_path_factory.mktemp("train")
    arch = ArchConfig.from_pattern("M-M-", d_model=32, vocab_size=257,
                                   mamba2=Mamba2Spec(d_state=8, headdim=8, chunk_size=8))
    arch.save(root / "arch.yaml")
    code = main(["train", str(root / "arch.yaml"), "--task", "corpus",
                 "--task-option", "seq_len=32", "--task-option", f"cache_dir={root / 'cache'}",
                 "--steps", "3", "--threads", "1", "--set", "batch_size=2",
                 "--set", "eval_every=3", "--set", "checkpoint_every=3",
                 "--out", str(root / "run")])
    assert code == 0
    return root / "run"


def test_a_train_folder_exports_to_transformers_with_its_tokenizer(trained_folder, tmp_path,
                                                                     capsys):
    run = json.loads((trained_folder / "run.json").read_text())
    assert run["task"] == "corpus" and run["task_fingerprint"]["tokenizer"]["kind"] == "byte"
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(trained_folder), "--format", "hf",
                 "--out", str(out)]) == 0
    assert "weights: transformers" in capsys.readouterr().out
    ours = HybridLM(ArchConfig.load(trained_folder / "arch.yaml"))
    (step,) = sorted(trained_folder.glob("step_*"))
    load_model(ours, str(step / "model.safetensors"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("a tiny corpus", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (theirs(ids).logits - ours.eval()(ids)).abs().max() <= 1e-5
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["source"]["checkpoint_step"] == 3
    assert manifest["source"]["task"] == "corpus"


def test_one_checkpoint_of_the_folder_exports_in_hybridlab_format(trained_folder, tmp_path):
    (step,) = sorted(trained_folder.glob("step_*"))
    assert main(["export", "--checkpoint", str(step), "--format", "hybridlab",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--study", "s"], "--study does not apply with --checkpoint"),
    (["--scale-to", "4x"], "--scale-to does not apply with --checkpoint"),
])
def test_study_options_are_refused_with_a_checkpoint(trained_folder, tmp_path, capsys, extra,
                                                     message):
    code = main(["export", "--checkpoint", str(trained_folder), "--format", "hf",
                 "--out", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_checkpoints_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["export", "--checkpoint", str(tmp_path / "empty"), "--format", "hf",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"--checkpoint {tmp_path / 'empty'}: no complete checkpoint" in err
    assert not (tmp_path / "out").exists()
