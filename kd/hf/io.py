"""safetensors checkpoints on disk: one file or a sharded index. Never pickle.

bfloat16 tensors are numpy arrays of ml_dtypes.bfloat16 both ways (safetensors.numpy maps them to
the BF16 safetensors dtype), float16 are plain numpy float16.
"""

import json
import os

import numpy as np
import safetensors.numpy

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


def set_path(tree: dict, path, value) -> None:
  """tree[path[0]][path[1]]...[path[-1]] = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in directory `path` (single file or sharded)."""
  single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
  if os.path.exists(single):
    return dict(safetensors.numpy.load_file(single))
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for shard in shards:
      out.update(safetensors.numpy.load_file(os.path.join(path, shard)))
    return out
  found = sorted(os.listdir(path)) if os.path.isdir(path) else 'no such directory'
  raise FileNotFoundError(
      f'no {SINGLE} or {INDEX} in {path} (found: {found}). kd reads safetensors only, never '
      'pickled .bin weights: convert them with transformers (`save_pretrained(..., '
      'safe_serialization=True)`).')


def save_file(tensors: dict[str, np.ndarray], file: str, metadata=None) -> None:
  """safetensors.numpy.save_file, atomically (a reader sees the old file or the new one, and no
  temporary file is left on failure), synced to disk, and with the mode any new file gets
  under the umask (safetensors itself writes 0600)."""
  tmp = f'{file}.tmp{os.getpid()}'
  try:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, file)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_tensors(tensors: dict[str, np.ndarray], path: str, *,
                  max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `tensors` as one file, or shards plus an index when larger than max_shard_bytes."""
  os.makedirs(path, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  meta = {'format': 'pt'}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SINGLE), metadata=meta)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(path, name), metadata=meta)
    weight_map.update({k: name for k in shard})
  total = sum(v.nbytes for v in tensors.values())
  with open(os.path.join(path, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=1)
