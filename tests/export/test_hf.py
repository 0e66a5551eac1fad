"""Hugging Face exports load in transformers and compute what hybridlab computes.

Each representable family is exported with trained-looking weights (every parameter moved off its
initial value), loaded with ``AutoModelForCausalLM.from_pretrained`` and compared with HybridLM:
no missing or unexpected keys, logits within ``LOGIT_ATOL`` (float32; the two differ only in the
order of floating-point operations), the same greedy continuation.
"""

import json
import random

import pytest
import torch
import yaml

from hybridlab.config import ArchConfig, AttentionSpec, Mamba2Spec, MLPSpec
from hybridlab.cost import param_count
from hybridlab.data.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_fingerprint
from hybridlab.export import ExportRefused, export_model
from hybridlab.export.study import export_study
from hybridlab.export.writer import write_config_export
from hybridlab.model import HybridLM

transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 1e-5
BYTE_VOCAB = ByteTokenizer.vocab_size

FAMILIES = {
    # NemotronH: Mamba-2 and RoPE-free attention layers, each its own block.
    "nemotron_h-attention-free": dict(pattern="MMM", d_model=64, headdim=16, ngroups=1,
                                      tie=True),
    "nemotron_h-gqa": dict(pattern="M*MM*", d_model=64, headdim=16, ngroups=2, tie=False,
                           attention=AttentionSpec(n_heads=4, n_kv_heads=2, rope=False)),
    "nemotron_h-mqa-wide-heads": dict(pattern="*MM*M", d_model=96, headdim=32, ngroups=3,
                                      tie=True,
                                      attention=AttentionSpec(n_heads=3, n_kv_heads=1,
                                                              head_dim=48, rope=False)),
    # Bamba: Mamba-2 + SwiGLU blocks with one group.
    "bamba-tied": dict(pattern="M-M-", d_model=64, headdim=16, ngroups=1, tie=True),
    "bamba-untied": dict(pattern="M-M-M-", d_model=80, headdim=20, ngroups=1, tie=False,
                         mlp=MLPSpec(multiplier=2.0, multiple_of=8)),
    # GraniteMoeHybrid without experts: Bamba's blocks with full RoPE (or none) attention.
    "granitemoehybrid-gqa-rope": dict(pattern="M-M-*-", d_model=64, headdim=16, ngroups=1,
                                      tie=True, attention=AttentionSpec(n_heads=4, n_kv_heads=2)),
    "granitemoehybrid-rope-theta": dict(pattern="*-M-M-", d_model=96, headdim=32, ngroups=1,
                                        tie=False,
                                        attention=AttentionSpec(n_heads=2, head_dim=32,
                                                                rope_theta=500000.0)),
    "granitemoehybrid-nope": dict(pattern="M-*-*-", d_model=64, headdim=16, ngroups=1,
                                  tie=False, attention=AttentionSpec(n_heads=8, n_kv_heads=1,
                                                                     rope=False)),
}
FLAVOURS = {name: name.split("-")[0] for name in FAMILIES}


def build(name: str, seed: int) -> HybridLM:
    f = FAMILIES[name]
    specs = {k: f[k] for k in ("attention", "mlp") if k in f}
    arch = ArchConfig.from_pattern(
        f["pattern"], d_model=f["d_model"], vocab_size=BYTE_VOCAB, tie_embeddings=f["tie"],
        mamba2=Mamba2Spec(d_state=16, headdim=f["headdim"], ngroups=f["ngroups"],
                          chunk_size=16), **specs)
    model = HybridLM(arch, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (hybridlab model, export folder, transformers model, loading info)."""
    done = {}
    for i, name in enumerate(FAMILIES):
        model = build(name, seed=100 + i)
        out = tmp_path_factory.mktemp("hf") / name
        result = export_model(model, "hf", out, tokenizer=ByteTokenizer())
        assert result.faithful and result.flavour == FLAVOURS[name], result.changes
        assert result.weights == "transformers"
        theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, output_loading_info=True)
        done[name] = (model, out, theirs.eval(), info)
    return done


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_with_strict_keys(exported, name):
    model, _, theirs, info = exported[name]
    assert {k: v for k, v in info.items() if v} == {}
    assert type(theirs).__name__ == {"nemotron_h": "NemotronHForCausalLM",
                                     "bamba": "BambaForCausalLM",
                                     "granitemoehybrid": "GraniteMoeHybridForCausalLM",
                                     }[FLAVOURS[name]]
    ours = sum(p.numel() for p in model.parameters())
    # transformers' NemotronH never ties its head: a tied model gains the head's copy.
    untied_copy = (FLAVOURS[name] == "nemotron_h" and model.config.tie_embeddings)
    extra = model.config.vocab_size * model.config.d_model if untied_copy else 0
    assert sum(p.numel() for p in theirs.parameters()) == ours + extra


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("length", [1, 17, 40])
def test_logits_equal_hybridlabs(exported, name, length):
    model, _, theirs, _ = exported[name]
    tokens = torch.randint(BYTE_VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        # The default forward, as a user calls it (use_cache as config.json says).
        diff = (theirs(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= LOGIT_ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_hybridlabs(exported, name):
    model, _, theirs, _ = exported[name]
    prompt = torch.randint(BYTE_VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = theirs.generate(prompt, max_new_tokens=12)
    ours = model.generate(prompt, max_new_tokens=12)
    # generate stops early only at the tokenizer's end of text (generation_config.json).
    assert hf.shape[1] == ours.shape[1] or hf[0, -1].item() == ByteTokenizer.eot_id
    assert torch.equal(hf, ours[:, : hf.shape[1]])


@pytest.mark.parametrize("name", FAMILIES)
def test_folder_holds_generation_config_and_hub_card(exported, name):
    model, out, _, _ = exported[name]
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.do_sample is False and generation.eos_token_id == ByteTokenizer.eot_id
    attends = any(isinstance(s, AttentionSpec) for s in model.config.layers)
    assert json.loads((out / "config.json").read_text())["use_cache"] is attends
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "text-generation"
    assert {"hybridlab", FLAVOURS[name]} <= set(header["tags"])
    assert "AutoModelForCausalLM.from_pretrained" in card


def random_text(seed: int) -> str:
    rng = random.Random(seed)
    alphabet = "abc xyz\t\n.,!?0123456789äöü€✓😀<|endoftext|>"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    docs = [random_text(seed) * 3 for seed in range(30)]
    return BPETokenizer.train(docs, vocab_size=320, out_dir=tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_files_load_with_autotokenizer_and_round_trip(tmp_path, bpe, kind):
    tokenizer = ByteTokenizer() if kind == "byte" else bpe
    arch = ArchConfig.from_pattern("M-", d_model=32, vocab_size=tokenizer.vocab_size,
                                   mamba2=Mamba2Spec(d_state=8, headdim=8, chunk_size=8))
    export_model(HybridLM(arch), "hf", tmp_path / "out", tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.eos_token_id == tokenizer.eot_id
    for seed in range(20):
        text = random_text(seed)
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.encode(text)
        assert theirs.decode(ids) == text


def test_an_untrained_config_builds_in_transformers_with_hybridlabs_parameter_count(tmp_path):
    arch = ArchConfig.from_pattern("M-M-M-", d_model=64, vocab_size=BYTE_VOCAB,
                                   mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16))
    result = write_config_export(arch, "hf", _empty(tmp_path / "out"))
    assert result.weights is None and not (tmp_path / "out" / "model.safetensors").exists()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == param_count(arch)


def test_a_lossy_export_writes_no_weights(tmp_path):
    arch = ArchConfig.from_pattern("M*-", d_model=64, vocab_size=BYTE_VOCAB,
                                   mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
                                   attention=AttentionSpec(n_heads=4))
    with pytest.raises(ExportRefused, match="as nemotron_h:"):
        export_model(HybridLM(arch), "hf", tmp_path / "refused")
    result = export_model(HybridLM(arch), "hf", tmp_path / "out", lossy=True)
    assert not result.faithful and result.weights is None
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "LOSSY.md").is_file()


def _empty(path):
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("text_task", [True, False])
def test_a_study_export_carries_the_tokenizer_its_task_trained_with(
    make_study, row, checkpoint_of, tmp_path, text_task
):
    model = build("bamba-tied", seed=7)
    fingerprint = ({"name": "corpus", "seq_len": 64,
                    "tokenizer": tokenizer_fingerprint(ByteTokenizer())} if text_task
                   else {"name": "mqar", "params": {"seq_len": 64}})
    url = make_study([row([0.5], arch=model.config, checkpoint=checkpoint_of(model),
                          fingerprint=fingerprint)], directions=["maximize"])
    done = export_study("s", selection="best", fmt="hf", out=tmp_path / "out", storage=url)
    (result,) = done.exports
    assert (tmp_path / "out" / "tokenizer.json").is_file() is text_task
    if text_task:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
        assert tokenizer("hi!", add_special_tokens=False)["input_ids"] == [104, 105, 33]
    else:
        assert any("no tokenizer" in note for note in result.notes)
