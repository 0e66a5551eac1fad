"""The tokenizer of an export as files that ``transformers.AutoTokenizer`` loads.

Every export whose task had a text tokenizer carries it: ``tokenizer.json`` (the ``tokenizers``
library's format), ``tokenizer_config.json`` and ``special_tokens_map.json``. The BPE tokenizer is
already a ``tokenizers`` JSON. The byte tokenizer becomes a byte-level BPE with no merges whose
vocabulary holds each byte's GPT-2 stand-in character at the byte's own id, so ids are the same
in both. As in hybridlab, ``<|endoftext|>`` written in a text stays plain text
(``split_special_tokens``): only the id 256 is the end of a document.
"""

from __future__ import annotations

import json

from hybridlab.data.tokenizer import ENDOFTEXT, ByteTokenizer, Tokenizer, byte_level_alphabet

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def _byte_level() -> dict[str, object]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
            "use_regex": False}


def _byte_tokenizer_json(tokenizer: ByteTokenizer) -> str:
    vocab = dict(sorted(byte_level_alphabet().items(), key=lambda item: item[1]))
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for name, i in tokenizer.special_tokens.items()]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": _byte_level(), "post_processor": None,
        "decoder": _byte_level(),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }, ensure_ascii=False)


def hf_tokenizer_files(tokenizer: Tokenizer, *, model_max_length: int) -> dict[str, str]:
    """File name -> text of the three files ``AutoTokenizer.from_pretrained`` reads."""
    serialized = (_byte_tokenizer_json(tokenizer) if isinstance(tokenizer, ByteTokenizer)
                  else tokenizer.to_json())
    special = {"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None,
              "unk_token": None, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    return {TOKENIZER_FILE: serialized, TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2),
            SPECIAL_TOKENS_FILE: json.dumps(special, indent=2)}
