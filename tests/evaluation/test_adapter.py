import shutil

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from hybridlab.evaluation.lm_eval import HybridLabLM
from hybridlab.evaluation.loading import EvalError
from hybridlab.model import HybridLM

EOT = 256


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over the whole sequence."""
    tokens = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(tokens)[0].float(), dim=-1)  # (L, vocab)
    return sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


def enc(text: str) -> list[int]:
    return list(text.encode())


def test_loglikelihood_equals_sum_of_token_logprobs(random_model):
    lm = HybridLabLM(random_model, batch_size=2, max_length=512)
    pairs = [("def f(x):\n    return", " x + 1"), ("Hello", ", world"), ("a", "b"),
             ("The quick brown fox jumps over", " the lazy dog"), ("é à", " ü")]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (score, _) in zip(pairs, results, strict=True):
        expected = direct_logprob(random_model, enc(context), enc(continuation))
        assert score == pytest.approx(expected, abs=1e-4)


def test_trailing_context_whitespace_is_scored_with_the_continuation(random_model):
    lm = HybridLabLM(random_model, max_length=512)
    (score, _), = lm.loglikelihood([request("loglikelihood", "x = 1 ", "+ 2")])
    assert score == pytest.approx(direct_logprob(random_model, enc("x = 1"), enc(" + 2")),
                                  abs=1e-4)


def test_empty_context_conditions_on_end_of_text(random_model):
    lm = HybridLabLM(random_model, max_length=512)
    (score, _), = lm.loglikelihood([request("loglikelihood", "", "import os")])
    assert score == pytest.approx(direct_logprob(random_model, [EOT], enc("import os")),
                                  abs=1e-4)


def test_long_context_is_truncated_on_the_left(random_model):
    lm = HybridLabLM(random_model, max_length=16)
    context, continuation = "0123456789" * 5, " tail"
    (score, _), = lm.loglikelihood([request("loglikelihood", context, continuation)])
    tokens = (enc(context) + enc(continuation))[-17:]
    expected = direct_logprob(random_model, tokens[: -len(continuation)], enc(continuation))
    assert score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(EvalError, match="does not fit max_length=16"):
        lm.loglikelihood([request("loglikelihood", "a", "b" * 17)])


def test_is_greedy(trained):
    lm = HybridLabLM(trained.model, max_length=512)
    # No trailing space: lm-eval moves a context's trailing whitespace onto the continuation,
    # which would score a token the greedy run never chose.
    context = "import os\nimport"
    greedy = trained.model.generate(torch.tensor([enc(context)]), 3, use_cache=False)
    continuation = bytes(greedy[0, len(enc(context)) :].tolist()).decode()
    wrong = "Q" if continuation[0] != "Q" else "Z"
    (_, yes), (_, no), (_, partly) = lm.loglikelihood([
        request("loglikelihood", context, continuation),
        request("loglikelihood", context, wrong + continuation[1:]),
        request("loglikelihood", context, continuation[:2] + wrong),
    ])
    assert yes and not no and not partly


@torch.no_grad()
def direct_rolling(model, text: str, max_length: int) -> float:
    """Every token predicted once: each window scores up to max_length new tokens and sees the
    max_length tokens before its last target (fewer at the start, where EOT comes first)."""
    tokens = [EOT, *enc(text)]
    total, scored = 0.0, 1
    while scored < len(tokens):
        end = min(scored + max_length, len(tokens))
        window = tokens[max(0, end - 1 - max_length) : end]
        logprobs = F.log_softmax(model(torch.tensor([window[:-1]]))[0].float(), dim=-1)
        for t in range(len(window) - (end - scored), len(window)):
            total += float(logprobs[t - 1, window[t]])
        scored = end
    return total


def test_rolling_within_one_window_is_the_full_sequence_nll(random_model):
    lm = HybridLabLM(random_model, max_length=256)
    text = "class Cache:\n    def __init__(self):\n        self.items = {}\n"
    (score,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert score == pytest.approx(direct_logprob(random_model, [EOT], enc(text)), abs=1e-4)


@pytest.mark.parametrize("max_length", [8, 13, 40])
def test_rolling_across_windows_matches_a_direct_windowed_computation(random_model, max_length):
    lm = HybridLabLM(random_model, max_length=max_length, batch_size=3)
    texts = ["for i in range(10):\n    print(i, i * i)\n", "x", "short text, two windows"]
    scores = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    for text, score in zip(texts, scores, strict=True):
        assert score == pytest.approx(direct_rolling(random_model, text, max_length), abs=1e-4)
    if len(enc(texts[0])) > max_length:
        # Later windows see more than the first one did, so the score is not the one-pass NLL.
        whole = direct_logprob(random_model, [EOT], enc(texts[0]))
        assert scores[0] != pytest.approx(whole, abs=1e-3)


def reference_text(model, context: str, n: int, until: list[str]) -> str:
    """Greedy decoding without the cache, cut at EOT and at the first stop string."""
    out = model.generate(torch.tensor([enc(context)]), n, use_cache=False)[0, len(enc(context)):]
    tokens = out.tolist()
    tokens = tokens[: tokens.index(EOT)] if EOT in tokens else tokens
    text = bytes(tokens).decode("utf-8", errors="replace")
    cuts = [text.find(s) for s in until if s in text]
    return text[: min(cuts)] if cuts else text


def test_generate_until_stops_at_the_stop_string_like_uncached_greedy(trained):
    lm = HybridLabLM(trained.model, max_length=256)
    # No trailing space: lm-eval moves a context's trailing whitespace onto the continuation,
    # which would score a token the greedy run never chose.
    context = "import os\nimport"
    full = reference_text(trained.model, context, 12, [])
    stop = full[2]
    expected = full[: full.index(stop)]
    stopped, unstopped = lm.generate_until([
        request("generate_until", context, {"until": [stop], "max_gen_toks": 12}),
        request("generate_until", context, {"until": ["\x00"], "max_gen_toks": 12}),
    ])
    assert stopped == expected == reference_text(trained.model, context, 12, [stop])
    assert unstopped == full


def test_generate_until_batches_match_one_by_one_uncached_decoding(random_model):
    lm = HybridLabLM(random_model, max_length=64, batch_size=2)
    contexts = ["abc", "xyz", "klm", "longer context"]
    options = {"until": ["\n"], "max_gen_toks": 7}
    outputs = lm.generate_until([request("generate_until", c, options) for c in contexts])
    assert outputs == [reference_text(random_model, c, 7, ["\n"]) for c in contexts]


def test_registered_for_lm_eval_and_built_from_arg_strings(trained):
    cls = get_model("hybridlab")
    assert cls is HybridLabLM
    lm = cls.create_from_arg_string(f"checkpoint={trained.run_dir},max_length=32",
                                    {"batch_size": "4", "device": "cpu"})
    assert (lm.max_length, lm.batch_size, lm.device.type) == (32, 4, "cpu")
    assert lm.source.checkpoint == trained.checkpoint
    for name, param in lm.model.state_dict().items():
        assert torch.equal(param, trained.model.state_dict()[name]), name


def test_bad_arguments_say_what_is_wrong(trained, tmp_path, make_arch):
    with pytest.raises(EvalError, match="exactly one of"):
        HybridLabLM()
    with pytest.raises(EvalError, match="trial= and storage= need study"):
        HybridLabLM(checkpoint=str(trained.run_dir), trial=3)
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(EvalError, match="neither a checkpoint folder"):
        HybridLabLM(checkpoint=str(tmp_path))
    bare = shutil.copytree(trained.checkpoint, tmp_path / "bare" / "step_00000040")
    with pytest.raises(EvalError, match=r"no arch\.yaml or arch\.json"):
        HybridLabLM(checkpoint=str(bare))
    with pytest.raises(EvalError, match="vocabulary has 64 ids"):
        HybridLabLM(HybridLM(make_arch(vocab_size=64)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback(trained):
    with pytest.raises(EvalError, match="CUDA is not available"):
        HybridLabLM(checkpoint=str(trained.run_dir), device="cuda:0")
