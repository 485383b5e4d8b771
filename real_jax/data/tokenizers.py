"""Tokenizers: one small protocol, a character tokenizer for synthetic tasks, and a `tokenizers`-library wrapper.

Every tokenizer here follows `Tokenizer`:

* `encode(text) -> list[int]` returns the ids of `text` only: no BOS, no EOS. The data layer adds those
  explicitly (a prompt gets BOS when the tokenizer has one, a response or completion gets EOS), so the same
  rule holds for every tokenizer and nothing is added twice.
* `decode(ids) -> str` drops special tokens (pad, bos, eos). Cutting a generated response at its first EOS is
  the caller's job (see `rewards.decode_responses`).
* `vocab_size`, `pad_id`, `eos_id`, `bos_id` (None when the tokenizer has no BOS).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["CharTokenizer", "HFTokenizer", "Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
  """What the data layer needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


# Digits, lowercase letters, space, newline and a few symbols: enough for the synthetic tasks and short
# instructions. 3 specials + 58 characters = 61 ids, which fits the `tiny` model's vocabulary of 256.
CHAR_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz \n+-*/=,.:;?!()[]<>'\"_#"


class CharTokenizer:
  """One id per character of a fixed alphabet; pad=0, bos=1, eos=2, then `CHAR_ALPHABET` in order.

  A character outside the alphabet raises `ValueError` naming it and its position (no silent UNK).
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  _N_SPECIAL = 3

  def __init__(self, alphabet: str = CHAR_ALPHABET):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f"CharTokenizer: alphabet has repeated characters: {alphabet!r}")
    if len(alphabet) + self._N_SPECIAL > 64:
      raise ValueError(f"CharTokenizer: alphabet of {len(alphabet)} characters gives more than 64 ids")
    self.alphabet = alphabet
    self._to_id = {c: i + self._N_SPECIAL for i, c in enumerate(alphabet)}
    self.vocab_size = len(alphabet) + self._N_SPECIAL

  def encode(self, text: str) -> list[int]:
    try:
      return [self._to_id[c] for c in text]
    except KeyError:
      pos = next(i for i, c in enumerate(text) if c not in self._to_id)
      raise ValueError(f"CharTokenizer: character {text[pos]!r} at position {pos} of {text[:40]!r} is not in the "
                       f"alphabet {self.alphabet!r}") from None

  def decode(self, ids: Sequence[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < self._N_SPECIAL:
        continue
      if i >= self.vocab_size:
        raise ValueError(f"CharTokenizer: id {i} is outside the vocabulary (size {self.vocab_size})")
      out.append(self.alphabet[i - self._N_SPECIAL])
    return "".join(out)

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size})"


# Conventional spellings, tried in order when neither an explicit argument nor tokenizer_config.json names one.
_CANDIDATES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
}


class HFTokenizer:
  """A `tokenizers.Tokenizer` (a `tokenizer.json`) behind the `Tokenizer` protocol.

  Special ids are resolved per kind (pad, eos, bos), first match wins:
    1. the explicit `<kind>_id=` argument, then the explicit `<kind>_token=` string;
    2. `tokenizer_config.json` beside the `tokenizer.json` (`from_file` only; plain JSON, the
       `"<kind>_token"` key as a string or `{"content": ...}`);
    3. the tokenizer's padding setting (pad only);
    4. a conventional spelling present in the vocabulary (`</s>`, `<|endoftext|>`, `<pad>`, `[PAD]`, `<s>`, ...).
  A missing pad or eos raises `ValueError` naming it (many LLaMA tokenizers have no pad: pass `pad_id=` e.g. the
  eos id; batches carry masks, so the pad value never matters). A missing bos leaves `bos_id = None`.

  `encode` never adds special tokens (the tokenizer's post-processor is bypassed with
  `add_special_tokens=False`); `decode` skips special tokens.
  """

  def __init__(self, tokenizer, *, pad_id: int | None = None, eos_id: int | None = None, bos_id: int | None = None,
               pad_token: str | None = None, eos_token: str | None = None, bos_token: str | None = None,
               config: dict | None = None, name: str = "tokenizer"):
    self._tok = tokenizer
    self.name = name
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = config or {}
    explicit = {"pad": (pad_id, pad_token), "eos": (eos_id, eos_token), "bos": (bos_id, bos_token)}
    ids = {}
    for kind, (given_id, given_token) in explicit.items():
      ids[kind] = self._resolve(kind, given_id, given_token, config)
    missing = [k for k in ("pad", "eos") if ids[k] is None]
    if missing:
      raise ValueError(f"HFTokenizer({name}): no {' or '.join(missing)} token found (looked at explicit arguments, "
                       f"tokenizer_config.json, and the spellings {[_CANDIDATES[k] for k in missing]}); pass "
                       + ", ".join(f"{k}_id= or {k}_token=" for k in missing)
                       + (" (the eos id is a fine pad id: batches carry masks)" if "pad" in missing else ""))
    self.pad_id, self.eos_id, self.bos_id = ids["pad"], ids["eos"], ids["bos"]

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> HFTokenizer:
    """Loads `tokenizer.json` (a file, or a directory holding one) and reads a sibling `tokenizer_config.json`."""
    import tokenizers  # the library; this module's name only shadows it inside the package

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer file at {path}")
    config = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    kwargs.setdefault("name", path)
    return cls(tokenizers.Tokenizer.from_file(path), config=config, **kwargs)

  def _resolve(self, kind: str, given_id: int | None, given_token: str | None, config: dict) -> int | None:
    if given_id is not None:
      if not 0 <= int(given_id) < self.vocab_size:
        raise ValueError(f"HFTokenizer({self.name}): {kind}_id={given_id} is outside the vocabulary "
                         f"(size {self.vocab_size})")
      return int(given_id)
    if given_token is not None:
      tid = self._tok.token_to_id(given_token)
      if tid is None:
        raise ValueError(f"HFTokenizer({self.name}): {kind}_token={given_token!r} is not in the vocabulary")
      return tid
    entry = config.get(f"{kind}_token")
    if isinstance(entry, dict):
      entry = entry.get("content")
    if isinstance(entry, str) and self._tok.token_to_id(entry) is not None:
      return self._tok.token_to_id(entry)
    if kind == "pad" and self._tok.padding is not None:
      return int(self._tok.padding["pad_id"])
    for spelling in _CANDIDATES[kind]:
      tid = self._tok.token_to_id(spelling)
      if tid is not None:
        return tid
    return None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    special = {self.pad_id, self.eos_id, self.bos_id}
    return self._tok.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id})")
