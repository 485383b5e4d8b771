"""real_jax.data: tokenizers, tasks, rewards, JSONL datasets, batching. Pure host code, no JAX, no network."""

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from real_jax import data
from real_jax.data import (CHAR_ALPHABET, CharTokenizer, DataError, HFTokenizer, PreferenceDataset, PromptDataset,
                           SFTDataset, TaskDataset, TaskSFTDataset)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
TOK = CharTokenizer()


def write_lines(path, lines):
  path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
  return path


# ---------------------------------------------------------------- tokenizers


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=CHAR_ALPHABET, max_size=40))
def test_char_tokenizer_round_trip(text):
  ids = TOK.encode(text)
  assert len(ids) == len(text) and all(3 <= i < TOK.vocab_size for i in ids)
  assert TOK.decode(ids) == text
  assert TOK.decode([TOK.bos_id] + ids + [TOK.eos_id, TOK.pad_id]) == text  # specials are dropped


def test_char_tokenizer_specials_and_unknown_character():
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
  assert TOK.vocab_size <= 64 and TOK.vocab_size == 3 + len(CHAR_ALPHABET)
  assert isinstance(TOK, data.Tokenizer)
  with pytest.raises(ValueError, match=r"'A' at position 3"):
    TOK.encode("abcA")


def _build_hf_tokenizer(dirpath, specials):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(["the cat sat on the mat", "a dog ate the cat"],
                          trainers.WordLevelTrainer(special_tokens=specials))
  dirpath.mkdir(exist_ok=True)
  tok.save(str(dirpath / "tokenizer.json"))
  return dirpath / "tokenizer.json"


def test_hf_tokenizer_from_local_file(tmp_path):
  path = _build_hf_tokenizer(tmp_path / "a", ["<pad>", "<s>", "</s>", "<unk>"])
  tok = HFTokenizer.from_file(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert isinstance(tok, data.Tokenizer) and tok.vocab_size > 4
  ids = tok.encode("the cat sat")
  assert len(ids) == 3 and tok.eos_id not in ids and tok.bos_id not in ids
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the cat sat"
  # tokenizer_config.json beside the file wins over conventional spellings; explicit arguments win over both.
  (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
  assert HFTokenizer.from_file(tmp_path / "a").eos_id == 3
  assert HFTokenizer.from_file(path, eos_token="</s>").eos_id == 2


def test_hf_tokenizer_missing_specials_are_named(tmp_path):
  path = _build_hf_tokenizer(tmp_path / "b", ["<unk>", "<|endoftext|>"])
  with pytest.raises(ValueError, match=r"no pad token.*pad_id="):
    HFTokenizer.from_file(path)
  tok = HFTokenizer.from_file(path, pad_token="<|endoftext|>")
  assert tok.pad_id == tok.eos_id == 1 and tok.bos_id is None
  with pytest.raises(ValueError, match="pad_token='<nope>'"):
    HFTokenizer.from_file(path, pad_token="<nope>")
  path = _build_hf_tokenizer(tmp_path / "c", ["<unk>"])
  with pytest.raises(ValueError, match="no pad or eos token"):
    HFTokenizer.from_file(path)


# ---------------------------------------------------------------- tasks and rewards


@pytest.mark.parametrize("name", ["arithmetic", "sorting", "reversal", "copy"])
def test_tasks_deterministic_and_rewarded(name):
  task = data.get_task(name, difficulty=2)
  exs = [task.example(seed=7, index=i) for i in range(20)]
  assert exs == [data.get_task(name, difficulty=2).example(seed=7, index=i) for i in range(20)]
  assert exs != [task.example(seed=8, index=i) for i in range(20)]
  for ex in exs:
    TOK.encode(ex.prompt + ex.answer)  # fits the char alphabet
    assert task.reward(ex.prompt, ex.answer, ex.answer) == 1.0
    assert task.reward(ex.prompt, " " + ex.answer + " ", ex.answer) == 1.0
    for wrong in (ex.answer + "1", ex.answer[:-1], "x" * len(ex.answer)):
      assert 0.0 <= task.reward(ex.prompt, wrong, ex.answer) < 1.0
  strict = data.get_task(name, partial_credit=False)
  assert strict.reward("", exs[0].answer + "0", exs[0].answer) == 0.0


def test_task_answers_are_correct():
  for i in range(30):
    ex = data.get_task("arithmetic", difficulty=2, ops="+-*").example(0, i)
    assert str(eval(ex.prompt[:-1])) == ex.answer  # prompt "a<op>b=": digits and one operator only
    ex = data.get_task("sorting").example(0, i)
    assert ex.answer == "".join(sorted(ex.prompt[5:-1]))
  # right-aligned partial credit: the ones digit counts first
  task = data.get_task("arithmetic")
  assert task.reward("", "4", "14") == 0.5 and task.reward("", "1", "14") == 0.0


def test_registries_name_unknown_keys():
  with pytest.raises(KeyError, match=r"'nope'.*arithmetic, copy, reversal, sorting"):
    data.get_task("nope")
  with pytest.raises(KeyError, match=r"'nope'.*char_overlap, exact_match, length_penalty"):
    data.get_reward("nope")
  with pytest.raises(TypeError, match=r"\['typo'\]"):
    data.get_reward("length_penalty", typo=1)


def test_rewards():
  em, co = data.get_reward("exact_match"), data.get_reward("char_overlap")
  assert em("p", " 42\n", "42") == 1.0 and em("p", "41", "42") == 0.0
  assert co("p", "abcd", "abcd") == 1.0 and co("p", "abxd", "abcd") == 0.75 and co("p", "abcdef", "abcd") == 4 / 6
  assert data.get_reward("char_overlap", align="right")("p", "2", "42") == 0.5
  lp = data.get_reward("length_penalty", target_len=4, scale=2.0)
  assert lp("p", "abcd", None) == 0.0 and lp("p", "abcdef", None) == -1.0
  with pytest.raises(ValueError, match="needs a ground-truth answer"):
    em("p", "x", None)
  both = data.combine_rewards({"exact_match": 1.0, "length_penalty": 0.5})
  assert both("p", "42", "42") == 1.0 and both("p", "4242", "42") == -0.5


def test_score_responses_stops_at_eos_and_ignores_pad():
  e, p = TOK.eos_id, TOK.pad_id
  rows = [TOK.encode("42") + [e] + TOK.encode("99") + [p],  # text after eos is ignored
          TOK.encode("4") + [p, p] + TOK.encode("2") + [p, p],  # pads are dropped
          TOK.encode("41") + [p, p, p, p]]
  ids_BT = np.asarray(rows)
  assert data.decode_responses(TOK, ids_BT) == ["42", "42", "41"]
  r = data.score_responses("exact_match", TOK, ["a", "b", "c"], ids_BT, ["42", "42", "42"])
  assert r.dtype == np.float32 and r.tolist() == [1.0, 1.0, 0.0]
  mask = np.ones_like(ids_BT, bool)
  mask[0, 1] = False
  assert data.decode_responses(TOK, ids_BT, mask)[0] == "4"


# ---------------------------------------------------------------- datasets


def test_fixture_datasets_with_field_names():
  ds = PromptDataset(FIXTURES / "prompts.jsonl", TOK, prompt_key="question", answer_key="answer")
  assert len(ds) == 5 and ds.num_skipped == 0 and ds.stats["records"] == 5
  assert ds[0].prompt == "what is 2+3?" and ds[0].answer == "5"
  assert ds[0].prompt_ids == (TOK.bos_id, *TOK.encode("what is 2+3?"))
  assert PromptDataset(FIXTURES / "prompts.jsonl", TOK, prompt_key="question")[0].answer is None
  pref = PreferenceDataset(FIXTURES / "preferences.jsonl", TOK)
  assert pref[1].chosen_ids == (*TOK.encode("cba"), TOK.eos_id)
  sft = SFTDataset(FIXTURES / "sft.jsonl", TOK)
  assert len(sft) == 4 and sft[0].completion == "5"


BAD_LINES = [
    (b'{"prompt": "ok"', "invalid JSON"),
    (b'["prompt", "x"]', "expected a JSON object, got list"),
    (b'{"question": "x"}', "missing field 'prompt'"),
    (b'{"prompt": 3}', "field 'prompt' must be a string, got int"),
    (b'{"prompt": "  "}', "field 'prompt' is empty"),
    (b'{"prompt": "Hello"}', "character 'H'"),
    (b'{"prompt": "\xff"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
  path = write_lines(tmp_path / "p.jsonl", [b'{"prompt": "ok 1"}', b"", bad, b'{"prompt": "ok 2"}'])
  with pytest.raises(DataError, match=rf"p\.jsonl:3: .*{message}"):
    PromptDataset(path, TOK)
  ds = PromptDataset(path, TOK, on_error="skip")
  assert [r.prompt for r in ds] == ["ok 1", "ok 2"]
  assert ds.num_skipped == ds.stats["skipped_malformed"] == 1
  assert ds.skipped_errors[0].startswith(f"{path}:3: ") and message in ds.skipped_errors[0]


def test_wrong_type_in_preference_and_sft(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "chosen": "b", "rejected": null}'])
  with pytest.raises(DataError, match=r"d\.jsonl:1: field 'rejected' must be a string, got NoneType"):
    PreferenceDataset(path, TOK)
  with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'completion'"):
    SFTDataset(path, TOK)
  with pytest.raises(DataError, match=r"<mem>:2: missing field 'answer'"):
    PromptDataset.from_rows([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], TOK, answer_key="answer",
                            source="<mem>")


def test_long_prompts_truncate_reject_skip(tmp_path):
  path = write_lines(tmp_path / "l.jsonl", ['{"prompt": "abc"}', '{"prompt": "abcdefghij"}'])
  ds = PromptDataset(path, TOK, max_prompt_len=5)  # truncate: bos + the LAST 4 characters
  assert ds[1].prompt_ids == (TOK.bos_id, *TOK.encode("ghij")) and ds.stats["truncated"] == 1
  assert ds[0].prompt_ids == (TOK.bos_id, *TOK.encode("abc"))
  assert PromptDataset(path, TOK, max_prompt_len=4, add_bos=False)[1].prompt_ids == tuple(TOK.encode("ghij"))
  with pytest.raises(DataError, match=r"l\.jsonl:2: prompt has 11 tokens > max_prompt_len=5"):
    PromptDataset(path, TOK, max_prompt_len=5, on_long="reject")
  ds = PromptDataset(path, TOK, max_prompt_len=5, on_long="skip")
  assert len(ds) == 1 and ds.stats["skipped_long"] == 1 and ds.num_skipped == 1
  with pytest.raises(ValueError, match="on_long must be one of"):
    PromptDataset(path, TOK, on_long="clip")
  # responses keep their first tokens (and so lose eos)
  path = write_lines(tmp_path / "s.jsonl", ['{"prompt": "p", "completion": "abcdef"}'])
  assert SFTDataset(path, TOK, max_response_len=3)[0].completion_ids == tuple(TOK.encode("abc"))


def test_empty_dataset_fails_naming_file(tmp_path):
  empty = write_lines(tmp_path / "empty.jsonl", [b"", b"  "])
  with pytest.raises(DataError, match=r"empty\.jsonl: no records \(0 non-blank lines"):
    PromptDataset(empty, TOK)
  bad = write_lines(tmp_path / "bad.jsonl", [b"{", b'{"x": 1}'])
  with pytest.raises(DataError, match=r"bad\.jsonl: no records .*2 malformed.*bad\.jsonl:1: invalid JSON"):
    PromptDataset(bad, TOK, on_error="skip")


# ---------------------------------------------------------------- batching


def test_bucket_length():
  assert [data.bucket_length(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
  assert data.bucket_length(9, [8, 12, 24]) == 12
  with pytest.raises(ValueError, match="longer than the largest bucket 24"):
    data.bucket_length(25, [8, 12, 24])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(3, 60), min_size=1, max_size=40), min_size=1, max_size=5),
       st.sampled_from(["left", "right"]))
def test_pad_sequences_property(seqs, side):
  t = data.bucket_length(max(map(len, seqs)))
  tokens_BT, mask_BT = data.pad_sequences(seqs, t, pad_id=0, side=side)
  assert t >= 16 and t & (t - 1) == 0 and (t == 16 or t < 2 * max(map(len, seqs)))
  for s, row, m in zip(seqs, tokens_BT, mask_BT):
    assert row[m].tolist() == s and (row[~m] == 0).all() and m.sum() == len(s)
    assert m[-1 if side == "left" else 0]  # real tokens touch the padded side's opposite edge


def test_prompt_batches_left_padded_and_bucketed():
  ds = PromptDataset(FIXTURES / "prompts.jsonl", TOK, prompt_key="question", answer_key="answer")
  b = next(data.prompt_batches(ds, 5, shuffle=False, buckets=[8, 12, 20, 40]))
  assert b.tokens_BT.dtype == np.int32 and b.mask_BT.dtype == bool
  assert b.tokens_BT.shape == (5, 20)  # longest: bos + "what is 10-4?" = 14 tokens
  for row, m, rec in zip(b.tokens_BT, b.mask_BT, ds):
    n = len(rec.prompt_ids)
    assert m.tolist() == [False] * (20 - n) + [True] * n
    assert tuple(row[-n:]) == rec.prompt_ids and (row[:-n] == TOK.pad_id).all()
  assert b.prompts == [r.prompt for r in ds] and b.answers == [r.answer for r in ds]
  assert b.indices.tolist() == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="largest bucket 8"):
    data.prompt_batches(ds, 2, buckets=[8])


def test_iterator_epochs_are_permutations():
  ds = TaskDataset("copy", TOK, seed=3, size=6)
  it = data.prompt_batches(ds, 3, seed=5)
  epochs = [np.concatenate([next(it).indices for _ in range(2)]) for _ in range(3)]
  assert all(sorted(e.tolist()) == list(range(6)) for e in epochs)
  assert any((epochs[0] != e).any() for e in epochs[1:])
  it = data.prompt_batches(ds, 4)  # 6 % 4: the last 2 records of each epoch are dropped
  assert [next(it).indices.size for _ in range(3)] == [4, 4, 4] and it.state()["epoch"] == 2


@pytest.mark.parametrize("size", [7, None])
def test_iterator_resume_exact(size):
  ds = TaskDataset("arithmetic", TOK, seed=1, size=size)
  whole = data.prompt_batches(ds, 3, seed=11)
  expected = [next(whole) for _ in range(8)]
  first = data.prompt_batches(ds, 3, seed=11)
  for _ in range(4):
    next(first)
  state = json.loads(json.dumps(first.state()))
  assert set(state) == {"seed", "epoch", "position", "size"}
  resumed = data.prompt_batches(ds, 3, seed=11)
  resumed.restore(state)
  for want in expected[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got.tokens_BT, want.tokens_BT)
    np.testing.assert_array_equal(got.mask_BT, want.mask_BT)
    assert got.prompts == want.prompts and got.answers == want.answers
  with pytest.raises(ValueError, match="state seed=11 but this iterator has seed=12"):
    data.prompt_batches(ds, 3, seed=12).restore(state)


def test_preference_batches_right_padded_with_response_masks():
  ds = PreferenceDataset(FIXTURES / "preferences.jsonl", TOK)
  b = next(data.preference_batches(ds, 4, shuffle=False))
  # longest: bos + "copy:hi=" + "hello there" + eos = 21 tokens -> bucket 32, for chosen and rejected alike
  assert b.chosen_tokens_BT.shape == b.rejected_tokens_BT.shape == (4, 32)
  for i, rec in enumerate(ds):
    for resp, tokens, mask, loss in ((rec.chosen_ids, b.chosen_tokens_BT, b.chosen_mask_BT, b.chosen_loss_mask_BT),
                                     (rec.rejected_ids, b.rejected_tokens_BT, b.rejected_mask_BT,
                                      b.rejected_loss_mask_BT)):
      n = len(rec.prompt_ids) + len(resp)
      assert tuple(tokens[i, :n]) == rec.prompt_ids + resp and (tokens[i, n:] == TOK.pad_id).all()
      assert mask[i].tolist() == [True] * n + [False] * (32 - n)
      assert tuple(tokens[i][loss[i]]) == resp and not (loss[i] & ~mask[i]).any()


def test_sft_batches_from_task_demonstrations():
  ds = TaskSFTDataset("reversal", TOK, seed=0, size=4)
  b = next(data.sft_batches(ds, 4, shuffle=False))
  assert b.tokens_BT.shape[1] == 32 and b.tokens_BT[:, 0].tolist() == [TOK.bos_id] * 4
  for i in range(4):
    completion = b.tokens_BT[i][b.loss_mask_BT[i]]
    assert completion[-1] == TOK.eos_id and TOK.decode(completion) == b.completions[i]
    assert TOK.decode(b.tokens_BT[i][b.mask_BT[i] & ~b.loss_mask_BT[i]]) == b.prompts[i]
    ex = ds.task.example(0, int(b.indices[i]))
    assert (ex.prompt, ex.answer) == (b.prompts[i], b.completions[i]) and ex.answer == ex.prompt[8:-1][::-1]
