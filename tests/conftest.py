import os
import pathlib

# Tests read the real data in ../shared/data unless KD_DATA_DIR says otherwise.
ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('KD_DATA_DIR', str(ROOT.parent / 'shared' / 'data'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
