"""Data for kd: text corpora, BPE tokenizers and packed LM batches (grain)."""

from kd.data.local import DATA_DIR_ENV
from kd.data.pipeline import Doc
from kd.data.pipeline import FEATURES
from kd.data.pipeline import make_eval_batches
from kd.data.pipeline import make_iterator
from kd.data.pipeline import make_lm_dataset
from kd.data.pipeline import make_mixed_dataset
from kd.data.pipeline import make_packed_dataset
from kd.data.pipeline import make_packed_eval_batches
from kd.data.pipeline import split_long
from kd.data.pipeline import tokenize_documents
from kd.data.text import CORPORA
from kd.data.text import load_text_split
from kd.data.text import split_speeches
from kd.data.text import split_text
from kd.data.text import TextSource
from kd.data.tokenizer import BOS_ID
from kd.data.tokenizer import decode
from kd.data.tokenizer import encode_batch
from kd.data.tokenizer import EOS_ID
from kd.data.tokenizer import get_or_train
from kd.data.tokenizer import load_tokenizer
from kd.data.tokenizer import PAD_ID
from kd.data.tokenizer import train_bpe
