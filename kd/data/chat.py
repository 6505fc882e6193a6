"""Records to token ids with a checkpoint's own tokenizer and chat template.

A text record becomes its ids as the tokenizer writes them (its BOS when it adds one); every
token after the first is a label. A chat record (`messages` of role/content, or `prompt` and
`completion`) is rendered by the tokenizer's chat template, and only the assistant turns are
labels, their end-of-turn token included, as in TRL's and MaxText's completion-only training.

How the assistant tokens are found: the template renders the conversation up to each assistant
turn (with the generation prompt) and up to its end; the characters in between are that turn.
The whole conversation is tokenized once with character offsets, and a token is a label when
it starts inside such a span. A template that renders earlier turns differently once later
turns follow is refused, since no span can be trusted then.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kd.data import sources
from kd.data.pipeline import Doc

ROLES = ('system', 'user', 'assistant')


def messages_of(record: dict, where: str = 'a chat record') -> list[dict]:
  """The record's conversation as [{'role', 'content'}], checked: known roles, string contents,
  and at least one assistant turn, none of them empty."""
  if 'messages' in record:
    messages = record['messages']
  else:
    messages = [{'role': 'user', 'content': record['prompt']},
                {'role': 'assistant', 'content': record['completion']}]
  if not isinstance(messages, (list, tuple)) or not messages:
    raise sources.DataError(f'{where}: "messages" must be a non-empty list of '
                            '{"role", "content"} objects')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES:
      role = m.get('role') if isinstance(m, dict) else m
      raise sources.DataError(f'{where}: message {i} has role {role!r}; roles are {ROLES}')
    if not isinstance(m.get('content'), str):
      raise sources.DataError(f'{where}: message {i} ({m["role"]}) has no text "content"')
    if m['role'] == 'assistant' and not m['content'].strip():
      raise sources.DataError(f'{where}: message {i} is an empty assistant turn; drop the record '
                              'or give the answer')
    out.append({'role': m['role'], 'content': m['content']})
  if not any(m['role'] == 'assistant' for m in out):
    raise sources.DataError(f'{where}: no assistant turn, so nothing to learn; end the '
                            'conversation with the assistant\'s answer')
  return out


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
  """(the rendered conversation, the [start, end) character span of each assistant turn)."""
  if not getattr(tokenizer, 'chat_template', None):
    raise sources.DataError('the tokenizer has no chat template; chat data needs one (give the '
                            "checkpoint's tokenizer_config.json chat_template) or use text data")
  text = _render(tokenizer, messages)
  spans = []
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    before = _render(tokenizer, messages[:i], generation_prompt=True)
    through = _render(tokenizer, messages[:i + 1])
    if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
      raise sources.DataError(
          'the chat template renders earlier turns differently once later turns follow, so the '
          'assistant tokens cannot be located; train on text, or use a template that only '
          'appends')
    end = len(before) + len(through[len(before):].rstrip())
    spans.append((len(before), end))
  return text, spans


def encode_chat(tokenizer, messages: Sequence[dict]) -> Doc:
  """The conversation's ids, weight 1 on the assistant turns' tokens (module docstring)."""
  text, spans = assistant_spans(tokenizer, messages)
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  starts = np.array([a for a, _ in enc['offset_mapping']], np.int64)
  weights = np.zeros(len(starts), np.float32)
  for a, b in spans:
    weights[(starts >= a) & (starts < b)] = 1.0
  return Doc(np.asarray(enc['input_ids'], np.int32), weights)


def prefix_ids(tokenizer, token: str) -> list[int]:
  """[the id of `token`] ('' gives []), refusing a string that is not one token."""
  if not token:
    return []
  ids = tokenizer.convert_tokens_to_ids([token])
  if ids[0] is None or ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token:
    raise sources.DataError(f'text_prefix {token!r} is not a token of the tokenizer; give one of '
                            f'its special tokens (e.g. {tokenizer.all_special_tokens[:4]}) or ""')
  return ids


def encode(tokenizer, records: Sequence[dict], *, vocab_size: int, where: str = 'data',
           text_prefix: str = '') -> list:
  """`Doc`s of text and chat records (text in one batched call); ids must fit `vocab_size`.
  `text_prefix`: a token put before every text document (the document separator a model was
  pretrained with, e.g. '<|endoftext|>', so that its first word is predicted as in training);
  '' puts nothing beyond what the tokenizer adds itself (e.g. Llama's BOS)."""
  kinds = [sources.kind(r, f'{where}, record {n}') for n, r in enumerate(records)]
  texts = [r['text'] for r, k in zip(records, kinds) if k == 'text']
  text_ids = iter(tokenizer(texts, add_special_tokens=True)['input_ids'] if texts else [])
  head = prefix_ids(tokenizer, text_prefix)
  docs = []
  for n, (r, k) in enumerate(zip(records, kinds)):
    if k == 'text':
      docs.append(Doc(np.asarray(head + next(text_ids), np.int32)))
    else:
      docs.append(encode_chat(tokenizer, messages_of(r, f'{where}, record {n}')))
  top = max((int(d.ids.max()) for d in docs if d.ids.size), default=-1)
  if top >= vocab_size:
    raise sources.DataError(f'{where}: token id {top} does not fit the model\'s {vocab_size} '
                            'vocabulary rows; the tokenizer is not the model\'s')
  return [d for d in docs if d.ids.size > 1]


def end_of_turn_id(tokenizer) -> int:
  """The token that ends an assistant turn in this chat template (the last label of a probe
  conversation): where a generated answer stops (<|im_end|>, Llama 3's <|eot_id|>, ...)."""
  doc = encode_chat(tokenizer, [{'role': 'user', 'content': 'Hi'},
                                {'role': 'assistant', 'content': 'Hello'}])
  return int(doc.ids[doc.weights > 0][-1])


def dialogue_arrays(tokenizer, records: Sequence[dict], *, prompt_len: int, response_len: int,
                    vocab_size: int, where: str = 'data') -> dict[str, np.ndarray]:
  """Chat records in kd.data.dialogue's fixed-shape layout, for on-policy (GKD) and SeqKD
  training: the prompt is the conversation before its last assistant turn, rendered with the
  generation prompt (its start cut when longer than prompt_len, left-padded); the response is
  that turn's tokens through its end-of-turn token (cut to response_len, ending in it)."""
  n = len(records)
  out = {'prompt_ids': np.zeros((n, prompt_len), np.int32),
         'prompt_mask': np.zeros((n, prompt_len), np.int32),
         'response_ids': np.zeros((n, response_len), np.int32),
         'response_mask': np.zeros((n, response_len), np.int32)}
  end = end_of_turn_id(tokenizer)
  for i, r in enumerate(records):
    if sources.kind(r) != 'chat':
      raise sources.DataError(f'{where}, record {i}: a text record; on-policy and SeqKD runs '
                              '(config.data.task=\'dialogue\') take chat records only')
    doc = encode_chat(tokenizer, messages_of(r, f'{where}, record {i}'))
    labelled = doc.weights > 0  # the last assistant turn is the last run of labels
    last = first = int(np.flatnonzero(labelled)[-1])
    while first > 0 and labelled[first - 1]:
      first -= 1
    prompt, response = doc.ids[:first][-prompt_len:], list(doc.ids[first:last + 1])
    if len(response) > response_len:
      response = response[:response_len - 1] + [end]
    out['prompt_ids'][i, prompt_len - len(prompt):] = prompt
    out['prompt_mask'][i, prompt_len - len(prompt):] = 1
    out['response_ids'][i, :len(response)] = response
    out['response_mask'][i, :len(response)] = 1
  top = max(out['prompt_ids'].max(initial=0), out['response_ids'].max(initial=0))
  if top >= vocab_size:
    raise sources.DataError(f'{where}: token id {top} does not fit the model\'s {vocab_size} '
                            'vocabulary rows; the tokenizer is not the model\'s')
  return out


def prompt_ids(tokenizer, messages: Sequence[dict]) -> tuple[np.ndarray, str]:
  """(ids of the conversation before its last assistant turn, with the generation prompt; that
  turn's reference answer): what a model is asked at evaluation."""
  last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
  text = _render(tokenizer, messages[:last], generation_prompt=True)
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  return np.asarray(ids, np.int32), messages[last]['content']
