"""Megatron export: every export's arguments against Megatron's own argument table, refusals with
their reasons, and the weights route (HF NemotronH export -> Megatron-Bridge's conversion).

The references are transcribed from Megatron's sources, not from hybridlab: see the ``source``
of tests/export/megatron_arguments.json (megatron-core 0.19.2's parser) and
tests/export/megatron_bridge_nemotron_h.json (megatron-bridge 0.6.2's NemotronH bridge). Neither
runs here: megatron-core ships ``megatron/training`` only from 0.17, which needs Python 3.12.
"""

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec, MLPSpec
from hybridlab.export import ExportError, ExportRefused, export_model, load_hybridlab, megatron
from hybridlab.model import HybridLM

HERE = Path(__file__).parent
ARGUMENTS = json.loads((HERE / "megatron_arguments.json").read_text())
BRIDGE = json.loads((HERE / "megatron_bridge_nemotron_h.json").read_text())
TYPES = {"int": int, "float": float, "str": str}


def arch(pattern: str, *, d_model: int = 64, vocab_size: int = 64, **specs) -> ArchConfig:
    specs.setdefault("mamba1", Mamba1Spec(d_state=8))
    specs.setdefault("mamba2", Mamba2Spec(d_state=16, headdim=16, chunk_size=16))
    specs.setdefault("attention", AttentionSpec(n_heads=4))
    return ArchConfig.from_pattern(pattern, d_model=d_model, vocab_size=vocab_size, **specs)


# One of each case the arguments branch on; the last two are written lossy.
EXPORTS = {
    "gqa-rope-mlp": (arch("M-M-*-", attention=AttentionSpec(n_heads=4, n_kv_heads=2),
                          mlp=MLPSpec(multiplier=2.0)), False),
    "attention-free-untied": (ArchConfig(d_model=64, vocab_size=100, tie_embeddings=False,
                                         layers=(Mamba2Spec(d_state=16, headdim=16, ngroups=2),)
                                         * 2), False),
    "nope-mha": (arch("M*", attention=AttentionSpec(n_heads=4, rope=False)), False),
    "no-mamba-eps-1e-6": (ArchConfig(d_model=64, vocab_size=64, norm_eps=1e-6, layers=(
        AttentionSpec(n_heads=4, rope_theta=500000.0), MLPSpec())), False),
    "mamba1-lossy": (arch("mM*-"), True),
    "fractional-rope-lossy": (arch("M*", attention=AttentionSpec(n_heads=4,
                                                                 rope_theta=12345.6)), True),
}


def table_parser() -> argparse.ArgumentParser:
    """An argparse parser with Megatron's definitions of the flags in the table."""
    # allow_abbrev=False as in Megatron's parse_args: a prefix of a flag is not that flag.
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for flag, spec in ARGUMENTS["flags"].items():
        if spec["action"] == "store":
            options = {key: spec[key] for key in ("choices", "nargs") if key in spec}
            parser.add_argument(flag, dest=spec["dest"], type=TYPES[spec["type"]], **options)
        else:
            parser.add_argument(flag, dest=spec["dest"], action=spec["action"])
    return parser


def parse(parser: argparse.ArgumentParser, tokens: list[str]) -> argparse.Namespace:
    namespace, unknown = parser.parse_known_args(tokens)
    assert unknown == [], f"flags Megatron does not define: {unknown}"
    return namespace


def exported(tmp_path: Path, name: str) -> dict:
    config, lossy = EXPORTS[name]
    export_model(HybridLM(config), "megatron", tmp_path / name, lossy=lossy)
    return json.loads((tmp_path / name / megatron.ARGS_JSON).read_text())


@pytest.mark.parametrize("name", EXPORTS)
def test_every_export_parses_with_megatrons_argument_table(tmp_path, name):
    written = exported(tmp_path, name)
    namespace = parse(table_parser(), written["argv"])
    for flag, value in written["arguments"].items():
        spec = ARGUMENTS["flags"][flag]
        parsed = getattr(namespace, spec["dest"])
        if spec["action"] == "store_false":
            assert parsed is False
        elif spec["action"] == "store_true":
            assert parsed is True
        else:
            # What Megatron reads is what the arguments say, in Megatron's type.
            assert parsed == value and type(parsed) is type(value), flag
    assert not set(written["arguments"]) & set(ARGUMENTS["deprecated"])


@pytest.mark.parametrize("name", EXPORTS)
def test_the_bash_array_holds_the_same_tokens(tmp_path, name):
    written = exported(tmp_path, name)
    script = tmp_path / name / megatron.ARGS_SH
    out = subprocess.run(["bash", "-c", f'source "{script}"; printf "%s\\n" "${{MODEL_ARGS[@]}}"'],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == written["argv"]


def test_the_table_rejects_what_the_issue_found():
    # Megatron's --rotary-base is type=int: the float form every RoPE export used to write fails.
    with pytest.raises(argparse.ArgumentError, match=r"invalid int value: '10000\.0'"):
        parse(table_parser(), ["--rotary-base", "10000.0"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parse(table_parser(), ["--position-embedding-type", "alibi"])


def test_megatrons_own_parser_matches_the_table_and_takes_every_export(tmp_path):
    arguments = pytest.importorskip(
        "megatron.training.arguments",
        reason="megatron-core >= 0.17 ships megatron/training; it needs Python 3.12")
    real = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    actions = {flag: action for action in real._actions for flag in action.option_strings}
    kinds = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
             argparse._StoreFalseAction: "store_false"}
    for flag, spec in ARGUMENTS["flags"].items():
        action = actions[flag]
        assert (kinds[type(action)], action.dest) == (spec["action"], spec["dest"]), flag
        if spec["action"] == "store":
            assert action.type is TYPES[spec["type"]], flag
            assert list(action.choices or []) == spec.get("choices", []), flag
            assert action.nargs == spec.get("nargs"), flag
    for name in EXPORTS:
        real.parse_args(exported(tmp_path, name)["argv"])


def test_arguments_match_the_architecture(trained, tmp_path, logits):
    model, _, _ = trained
    result = export_model(model, "megatron", tmp_path / "out")
    assert result.faithful
    written = json.loads((tmp_path / "out" / megatron.ARGS_JSON).read_text())
    assert written["hybrid_override_pattern"] == "M-M-*-"
    assert written["arguments"] == {
        "--num-layers": 6, "--hybrid-layer-pattern": "M-M-*-",
        "--spec": ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"],
        "--hidden-size": 64, "--normalization": "RMSNorm", "--norm-epsilon": 1e-5,
        "--disable-bias-linear": True, "--hidden-dropout": 0.0, "--attention-dropout": 0.0,
        "--seq-length": 2048, "--max-position-embeddings": 2048, "--vocab-size": 64,
        "--make-vocab-size-divisible-by": 64,
        "--mamba-state-dim": 16, "--mamba-head-dim": 16, "--mamba-num-groups": 1,
        "--mamba-num-heads": 8, "--num-attention-heads": 4, "--kv-channels": 16,
        "--group-query-attention": True, "--num-query-groups": 2,
        "--position-embedding-type": "rope", "--rotary-base": 10000, "--rotary-percent": 1.0,
        "--ffn-hidden-size": 128, "--swiglu": True,
    }
    script = (tmp_path / "out" / megatron.ARGS_SH).read_text()
    assert "    --hybrid-layer-pattern 'M-M-*-'\n" in script  # the * is quoted for bash
    assert "--hybrid-override-pattern" in script.split("MODEL_ARGS=(")[0]  # the older spelling
    assert any("no trained sequence length" in note for note in result.notes)
    # Megatron gets arguments only; the trained weights ride along in hybridlab's names.
    assert torch.equal(logits(load_hybridlab(tmp_path / "out")), logits(model))


def test_the_vocabulary_is_not_padded_beyond_what_megatron_bridge_keeps():
    # MegatronModelBridge.make_vocab_size_divisible_by: the largest power of two <= 128 that
    # divides the vocabulary, so Megatron's padded size (at TP 1) is the vocabulary itself.
    for vocab, divisor in [(64, 64), (100, 4), (50304, 128), (257, 1)]:
        target = megatron.fit(arch("M", vocab_size=vocab)).target
        args = megatron.arguments(target, seq_length=8)
        assert args["--make-vocab-size-divisible-by"] == divisor
        assert vocab % divisor == 0


REFUSALS = [
    (arch("m*-"), ["layers[0] = mamba1", "Megatron has no Mamba-1 layer"]),
    (arch("M*", mamba2=Mamba2Spec(d_state=16, headdim=16, d_conv=3)),
     ["layers[0].d_conv = 3", "d_conv=4"]),
    (ArchConfig(d_model=64, vocab_size=64, layers=(AttentionSpec(n_heads=4),
                                                   AttentionSpec(n_heads=2))),
     ["layers[1].n_heads = 2", "every attention layer"]),
    (arch("M*M", attention=AttentionSpec(n_heads=4, rope_theta=10000.5)),
     ["layers[1].rope_theta = 10000.5", "--rotary-base is an integer"]),
    (ArchConfig(d_model=64, vocab_size=64, norm_eps=1e-6, layers=(
        Mamba2Spec(d_state=16, headdim=16), AttentionSpec(n_heads=4),
        Mamba2Spec(d_state=16, headdim=16))),
     ["norm_eps = 1e-06", "gated RMSNorm's eps at 1e-5"]),
]


@pytest.mark.parametrize(("config", "expected"), REFUSALS,
                         ids=[f"{c.pattern}-{i}" for i, (c, _) in enumerate(REFUSALS)])
def test_unrepresentable_architecture_is_refused_with_the_reason(tmp_path, config, expected):
    with pytest.raises(ExportRefused) as refused:
        export_model(HybridLM(config), "megatron", tmp_path / "out")
    message = str(refused.value)
    assert "format 'megatron' cannot represent" in message and "--lossy" in message
    for text in expected:
        assert text in message
    assert list(tmp_path.iterdir()) == []


def test_norm_eps_names_the_mamba_layers_whose_gated_norm_differs():
    fitted = megatron.fit(REFUSALS[-1][0])
    assert [(c.where, c.now) for c in fitted.changes] == [
        ("norm_eps", "1e-05 in the gated norms of layers [0, 2]")]
    # The other norms keep the trained eps: that is what --norm-epsilon sets.
    args = megatron.arguments(fitted.target, seq_length=8)
    assert args["--norm-epsilon"] == 1e-6


def test_lossy_rope_base_is_rounded_to_megatrons_integer(tmp_path):
    written = exported(tmp_path, "fractional-rope-lossy")
    assert written["arguments"]["--rotary-base"] == 12346
    lossy = (tmp_path / "fractional-rope-lossy" / "LOSSY.md").read_text()
    assert "layers[1].rope_theta" in lossy and "12345.6" in lossy


def test_arguments_refuse_a_config_that_was_not_fitted():
    unfitted = arch("M*", attention=AttentionSpec(n_heads=4, rope_theta=0.5))
    with pytest.raises(ExportError, match=r"layers\[1\]\.rope_theta = 0\.5 is not an integer"):
        megatron.arguments(unfitted, seq_length=8)


def test_lossy_converts_mamba1_and_writes_its_closest_arguments(tmp_path):
    result = export_model(HybridLM(arch("mM*-")), "megatron", tmp_path / "out", lossy=True)
    assert [c.where for c in result.changes] == ["layers[0]"]
    written = json.loads((tmp_path / "out" / megatron.ARGS_JSON).read_text())
    assert written["hybrid_override_pattern"] == "MM*-"
    assert not (tmp_path / "out" / "hybridlab_weights.safetensors").exists()


# The weights route: a NemotronH folder (Mamba-2 and RoPE-free attention, no MLP) that
# Megatron-Bridge's NemotronHBridge converts into the model these arguments build.
ROUTE = {
    "gqa-untied": arch("M*M", attention=AttentionSpec(n_heads=4, n_kv_heads=2, rope=False)),
    "mha-tied": ArchConfig(d_model=64, vocab_size=64, tie_embeddings=True, layers=(
        Mamba2Spec(d_state=16, headdim=16, ngroups=2, chunk_size=16),
        AttentionSpec(n_heads=4, rope=False))),
    "attention-free": arch("MM"),
}


def _bridge_regex(pattern: str) -> re.Pattern:
    # MegatronMappingRegistry._convert_pattern_to_regex, matched with re.match as its lookups do.
    return re.compile(re.escape(pattern).replace(r"\*\*", "(.*)").replace(r"\*", r"(\d+)"))


def _fill(pattern: str, captures: tuple[str, ...]) -> str:
    for capture in captures:
        pattern = pattern.replace("*", capture, 1)
    return pattern


def bridge_sources(megatron_name: str) -> list[str]:
    """The HF tensors the Bridge reads for one Megatron parameter (its first matching mapping,
    as MegatronMappingRegistry.megatron_to_hf_lookup); [] when no mapping matches."""
    for mapping in BRIDGE["param_mappings"]:
        match = _bridge_regex(mapping["megatron"]).match(megatron_name)
        if match:
            hf = mapping["hf"]
            return [_fill(h, match.groups()) for h in (hf.values() if isinstance(hf, dict)
                                                       else [hf])]
    return []


def megatron_parameters(pattern: str, *, tied: bool) -> list[str]:
    """Megatron's HybridModel parameter names for ``pattern`` (hybrid_stack_spec, TP 1, PP 1)."""
    names = [f"decoder.layers.{i}.{p}" for i, symbol in enumerate(pattern)
             for p in BRIDGE["megatron_layer_params"][symbol]]
    return names + BRIDGE["megatron_model_params"] + ([] if tied
                                                      else BRIDGE["megatron_untied_params"])


def assert_bridge_converts(keys: set[str], pattern: str, *, tied: bool) -> None:
    """Every Megatron parameter is read from tensors in ``keys``, and every tensor is read
    (a tied model has no output layer, so the head may go unread)."""
    read: set[str] = set()
    for name in megatron_parameters(pattern, tied=tied):
        sources = bridge_sources(name)
        assert sources, f"the Bridge has no mapping for Megatron's {name}"
        missing = set(sources) - keys
        assert not missing, f"{name} needs {sorted(missing)}, not in the HF checkpoint"
        read |= set(sources)
    unread = keys - read - ({"lm_head.weight"} if tied else set())
    assert not unread, f"the Bridge would drop {sorted(unread)}"


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("tied", [False, True])
def test_bridge_mapping_covers_transformers_nemotron_h_checkpoints(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    # Every layer kind NemotronH has, even the MLP hybridlab's export refuses (ungated).
    config = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=64, hybrid_override_pattern="M*-M", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, ssm_state_size=16,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, chunk_size=16,
        tie_word_embeddings=tied)
    transformers.NemotronHForCausalLM(config).save_pretrained(tmp_path)
    # What save_pretrained writes is what the Bridge reads: SafeTensorsStateSource opens the
    # files, it does not load the model (whose in-memory names start with model.).
    assert_bridge_converts(safetensors_keys(tmp_path / "model.safetensors"), "M*-M", tied=tied)


@pytest.mark.parametrize("name", ROUTE)
def test_hf_export_weights_are_what_the_bridge_converts(tmp_path, name):
    config = ROUTE[name]
    export_model(HybridLM(config), "hf", tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "nemotron_h"
    keys = safetensors_keys(tmp_path / "hf" / "model.safetensors")
    assert_bridge_converts(keys, config.pattern, tied=written["tie_word_embeddings"])


def bridge_provider_settings(hf_config) -> dict:
    """Megatron settings NemotronHBridge derives from an HF config: CONFIG_MAPPING with the
    first present HF field winning each Megatron name (hf_config_to_provider_kwargs), then
    provider_bridge's overrides."""
    settings: dict = {}
    for hf_name, megatron_name in BRIDGE["config_mapping"]:
        if hasattr(hf_config, hf_name) and megatron_name not in settings:
            settings[megatron_name] = getattr(hf_config, hf_name)
    return settings | BRIDGE["provider_overrides"]


def megatron_settings(args: dict) -> dict:
    """The Megatron config the export's arguments build, in the provider's field names
    (core_transformer_config_from_args / hybrid_config_from_args)."""
    settings = {
        "num_layers": args["--num-layers"], "hidden_size": args["--hidden-size"],
        "vocab_size": args["--vocab-size"], "seq_length": args["--seq-length"],
        "layernorm_epsilon": args["--norm-epsilon"],
        "hybrid_layer_pattern": args["--hybrid-layer-pattern"],
        "add_bias_linear": not args["--disable-bias-linear"],
        "share_embeddings_and_output_weights":
            not args.get("--untie-embeddings-and-output-weights", False),
        "hidden_dropout": args["--hidden-dropout"],
        "attention_dropout": args["--attention-dropout"],
        "position_embedding_type": args["--position-embedding-type"],
        "mamba_state_dim": args["--mamba-state-dim"], "mamba_head_dim": args["--mamba-head-dim"],
        "mamba_num_groups": args["--mamba-num-groups"],
        "mamba_num_heads": args["--mamba-num-heads"],
    }
    if "--kv-channels" in args:
        # Without --group-query-attention Megatron uses one group per head.
        settings |= {"num_attention_heads": args["--num-attention-heads"],
                     "kv_channels": args["--kv-channels"],
                     "num_query_groups": args.get("--num-query-groups",
                                                  args["--num-attention-heads"])}
    return settings


@pytest.mark.parametrize("name", ROUTE)
def test_bridge_reads_from_the_hf_config_what_the_megatron_arguments_say(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    config = ROUTE[name]
    export_model(HybridLM(config), "hf", tmp_path / "hf")
    export_model(HybridLM(config), "megatron", tmp_path / "megatron")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "nemotron_h"
    args = json.loads((tmp_path / "megatron" / megatron.ARGS_JSON).read_text())["arguments"]
    want = megatron_settings(args)
    have = bridge_provider_settings(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    assert {key: have.get(key) for key in want} == want
    # TransformerConfig raises for num_moe_experts <= 0; NemotronHConfig's MoE defaults are
    # unused without E layers.
    assert have.get("num_moe_experts") is None or have["num_moe_experts"] > 0


def test_usage_names_the_conversion_steps_that_run_here(tmp_path):
    config = ROUTE["gqa-untied"]
    export_model(HybridLM(config), "megatron", tmp_path / "megatron")
    text = megatron.usage(weights_route=True)
    assert text.startswith(megatron.usage(weights_route=False))
    assert "AutoBridge.import_ckpt(" in text and "--load" in text
    first = text.split("```python\n")[1].split("```")[0]
    # The hybridlab step of the route, exactly as the card writes it.
    exec(first.replace("<this folder>", str(tmp_path / "megatron"))
         .replace("<hf folder>", str(tmp_path / "hf")), {})
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "nemotron_h"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
