"""lm-eval model adapter: any lm-eval task on a HybridLM with hybridlab's tokenizer.

Importing this module imports lm-eval and registers the model as ``hybridlab``; the rest of
hybridlab imports it only when an evaluation runs, so ``import hybridlab`` stays light.

From Python::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from hybridlab.evaluation.lm_eval import HybridLabLM
    from hybridlab.evaluation.tasks import TASKS_DIR

    lm = HybridLabLM(checkpoint="runs/train/<run>", device="cpu")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["hybridlab_local"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))

From lm-eval's command line: lm-eval has no plugin discovery for models, so its own ``lm_eval``
command cannot see the registration; ``python -m hybridlab.evaluation.lm_eval_cli`` imports this
module and then runs lm-eval's CLI unchanged, taking the same arguments::

    python -m hybridlab.evaluation.lm_eval_cli --model hybridlab \\
        --model_args checkpoint=runs/train/<run>,max_length=256 --batch_size 16 \\
        --include_path hybridlab/evaluation/tasks --tasks hybridlab_local,lambada_openai

    python -m hybridlab.evaluation.lm_eval_cli --model hybridlab --device cuda \\
        --model_args study=lm-small,storage=sqlite:///runs/lm-small.db,trial=12 \\
        --include_path hybridlab/evaluation/tasks --tasks hybridlab_bpb

Model arguments: ``checkpoint`` (a step folder or a run folder; ``arch`` names the architecture
file when there is no arch.yaml beside it), or ``study`` + ``trial`` (+ ``storage``, default
``sqlite:///runs/<study>.db``); ``tokenizer`` ("byte" or a BPE JSON path), ``max_length``
(context window; default the trial's training ``seq_len``, else 2048), ``max_gen_toks``,
``seed`` (sampling only), ``device`` and ``batch_size`` (which win over lm-eval's ``--device``
and ``--batch_size``). Without any device the model runs where ``hybridlab eval`` runs it: CUDA
when available, else the CPU (``lm_eval_cli`` sets that in place of lm-eval's ``cuda:0``); asking
for CUDA where there is none is an error, not a fallback.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tqdm import tqdm

from hybridlab.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint
from hybridlab.evaluation.loading import (
    EvalError,
    ModelSource,
    load_model,
    resolve_checkpoint,
    resolve_device,
    resolve_trial,
)
from hybridlab.model import HybridLM, _pick
from hybridlab.store import default_sqlite_url

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
# generate_until keyword arguments this adapter acts on; any other is logged and ignored.
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k"}

# ((context, continuation) or None, context tokens, continuation tokens)
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes ints, digit strings or "auto"; "auto" means the default here."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise EvalError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if size < 1:
        raise EvalError(f"batch_size must be >= 1, got {value!r}")
    return size


@register_model("hybridlab")
class HybridLabLM(TemplateLM):
    """A HybridLM behind lm-eval's ``LM`` interface (causal, scored in fp32).

    Give exactly one of ``model`` (a HybridLM already built), ``source`` (a resolved
    ``ModelSource``), ``checkpoint`` or ``study`` with ``trial``. Log-likelihoods are summed
    over exactly the continuation's tokens, with contexts truncated on the left to
    ``max_length``; rolling log-likelihoods use lm-eval's disjoint windows; generation is greedy
    (sampling when ``do_sample``) with the inference cache.
    """

    def __init__(
        self,
        model: HybridLM | None = None,
        *,
        source: ModelSource | None = None,
        checkpoint: str | None = None,
        arch: str | None = None,
        study: str | None = None,
        storage: str | None = None,
        trial: int | None = None,
        tokenizer: str | Tokenizer = "byte",
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        given = [name for name, value in (("model", model), ("source", source),
                                          ("checkpoint", checkpoint), ("study", study))
                 if value is not None]
        if len(given) != 1:
            raise EvalError("give exactly one of model=<HybridLM>, source=<ModelSource>, "
                            "checkpoint=PATH or study=NAME with trial=N "
                            f"(got {', '.join(given) or 'none'})")
        if (trial is not None or storage is not None) and study is None:
            raise EvalError("trial= and storage= need study=NAME")
        if arch is not None and checkpoint is None:
            raise EvalError("arch= goes with checkpoint=PATH")
        if checkpoint is not None:
            source = resolve_checkpoint(checkpoint, arch=arch)
        elif study is not None:
            if trial is None:
                raise EvalError(f"study={study}: which trial? (trial=N)")
            source = resolve_trial(storage or default_sqlite_url(study), study, int(trial))
        self.source = source
        self._tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._check_tokenizer(source)
        if model is not None:
            self.model = model.to(resolve_device(device) if device else model.device).eval()
        else:
            assert source is not None
            self.model = load_model(source, device=device)
        self._device = self.model.device
        vocab = self.model.config.vocab_size
        if vocab < self._tokenizer.vocab_size:
            trained = f" (trained on {source.task!r})" if source and source.task else ""
            raise EvalError(f"the model's vocabulary has {vocab} ids{trained} but the "
                            f"{self._tokenizer.kind} tokenizer needs {self._tokenizer.vocab_size}: "
                            "lm-eval tasks need a model trained on text (a corpus task)")
        if source is not None and source.task and not source.task.startswith("corpus"):
            log.warning("%s was trained on %r, not on text: its lm-eval scores say little",
                        source.describe(), source.task)
        if max_batch_size is not None:
            log.info("max_batch_size is ignored: batches have a fixed size")
        self._batch_size = _batch_size(batch_size)
        length = max_length or (source.seq_len if source else None) or DEFAULT_MAX_LENGTH
        self._max_length = int(length)
        self._max_gen_toks = int(max_gen_toks)
        if self._max_length < 2 or self._max_gen_toks < 1:
            raise EvalError(f"max_length must be >= 2 and max_gen_toks >= 1, got "
                            f"{self._max_length} and {self._max_gen_toks}")
        self.seed = int(seed)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> HybridLabLM:
        """lm-eval's constructor hook. It always adds its own ``device`` and ``batch_size``
        settings, which would collide with the same keys in ``--model_args``: those win."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> HybridLabLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _check_tokenizer(self, source: ModelSource | None) -> None:
        recorded = source.task_fingerprint.get("tokenizer") if source else None
        if isinstance(recorded, dict) and recorded != tokenizer_fingerprint(self._tokenizer):
            raise EvalError(
                f"{source.describe()} was trained with tokenizer {recorded.get('kind')} "
                f"{str(recorded.get('hash'))[:12]}..., not with the {self._tokenizer.kind} "
                "tokenizer given; pass tokenizer=<the BPE JSON file it was trained with>")

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        fingerprint = tokenizer_fingerprint(self._tokenizer)
        return f"hybridlab-{fingerprint['kind']}-{fingerprint['hash'][:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        # hybridlab's tokenizers add no special tokens; documents are separated by EOT only.
        return self._tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by lm-eval in ``results["config"]``."""
        config = self.model.config
        info: dict[str, Any] = {
            "hybridlab_pattern": config.pattern, "genome_hash": config.canonical_hash(),
            "params": sum(p.numel() for p in self.model.parameters()),
            "tokenizer": tokenizer_fingerprint(self._tokenizer), "max_length": self.max_length,
        }
        if self.source is not None:
            info.update(checkpoint=str(self.source.checkpoint), study=self.source.study,
                        trial=self.source.trial)
        return info

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation token) and whether greedy decoding picks every one.

        Requests run longest first, right-padded in batches (padding after a causal sequence
        changes nothing before it); only the continuation's rows reach the LM head.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="hybridlab loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs: list[list[int]] = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation:
                    raise EvalError("a loglikelihood request needs a non-empty context and "
                                    "continuation after tokenization")
                if len(continuation) > self.max_length:
                    raise EvalError(f"a continuation of {len(continuation)} tokens does not fit "
                                    f"max_length={self.max_length}")
                # The last max_length + 1 tokens; the final one is only ever a target.
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            longest = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), longest, dtype=torch.long)  # (B, L)
            for row, tokens in enumerate(inputs):
                batch[row, : len(tokens)] = torch.tensor(tokens)
            hidden = self.model.hidden_states(batch.to(self.device))  # (B, L, d_model)
            rows = [hidden[row, len(tokens) - len(requests[i][2]) : len(tokens)]
                    for row, (i, tokens) in enumerate(zip(chunk, inputs, strict=True))]
            logprobs = F.log_softmax(self.model.lm_head(torch.cat(rows)).float(), dim=-1)
            offset = 0
            for i in chunk:
                key, _, continuation = requests[i]
                target = torch.tensor(continuation, device=self.device)
                lp = logprobs[offset : offset + len(continuation)]  # (C, vocab)
                offset += len(continuation)
                score = (float(lp.gather(-1, target[:, None]).sum()),
                         bool((lp.argmax(dim=-1) == target).all()))
                results[i] = score
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, score)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        """Log-likelihood of whole texts, every token predicted once (lm-eval's rolling windows).

        The first window conditions on EOT; later windows are disjoint in what they score and
        take the preceding tokens as context, up to ``max_length`` inputs each.
        """
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for r, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text),
                                              prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm),
                                 strict=True):
            totals[r] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _options(self, gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int, float, int]:
        """(stop strings, max new tokens, temperature (0: greedy), top_k (0: all))."""
        unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
        if unknown:
            log.warning("generate_until ignores %s", ", ".join(unknown))
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(s for s in until if s)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_new < self.max_length:
            raise EvalError(f"max_gen_toks={max_new} must be in 1..max_length-1 "
                            f"({self.max_length - 1})")
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
        return until, max_new, temperature, int(gen_kwargs.get("top_k") or 0)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Decode each context until a stop string, EOT or ``max_gen_toks`` new tokens.

        Contexts of equal length and options share a batch (no padding, which would feed pad
        tokens through the recurrent state); each is truncated on the left to leave room for
        the new tokens within ``max_length``.
        """
        groups: dict[tuple[int, tuple], list[int]] = defaultdict(list)
        prompts: list[list[int]] = []
        options = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            opts = self._options(dict(gen_kwargs))
            tokens = self.tok_encode(context)[-(self.max_length - opts[1]) :] or [
                self.prefix_token_id]
            prompts.append(tokens)
            options.append(opts)
            groups[(len(tokens), opts)].append(i)
        outputs: list[str] = [""] * len(requests)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="hybridlab generate")
        for (_, opts), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompt = torch.tensor([prompts[i] for i in chunk], device=self.device)
                for i, text in zip(chunk, self._decode(prompt, *opts, generator), strict=True):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return outputs

    @torch.inference_mode()
    def _decode(self, prompt: torch.Tensor, until: tuple[str, ...], max_new: int,
                temperature: float, top_k: int, generator: torch.Generator) -> list[str]:
        """prompt (B, L) -> B continuations, cut before the first stop string."""
        batch = prompt.shape[0]
        cache = self.model.allocate_cache(batch, prompt.shape[1] + max_new)
        logits = self.model(prompt, cache=cache)[:, -1]  # (B, vocab)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        texts = [""] * batch
        done = [False] * batch
        for step in range(max_new):
            # HybridLM.generate's own rule, so greedy here is exactly its argmax.
            picked = _pick(logits.float(), temperature, top_k or None, generator)  # (B,)
            for b, token in enumerate(picked.tolist()):
                if done[b]:
                    continue
                if token == self.eot_token_id:
                    done[b] = True
                    continue
                tokens[b].append(token)
                text = self.tok_decode(tokens[b])
                stops = [text.find(s) for s in until if s in text]
                texts[b] = text[: min(stops)] if stops else text
                done[b] = bool(stops)
            if all(done) or step == max_new - 1:
                break
            logits = self.model.step(picked, cache)
        return texts

