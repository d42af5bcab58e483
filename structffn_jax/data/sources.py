"""Text sources: where documents (plain `str`s) come from before tokenization.

Four kinds, selected by `cfg.data.source`:

  text    plain UTF-8 files (`data.*_paths`). A file in WikiText layout is split into one document
          per article (an article starts at a top-level heading line ` = Title = `); any other file
          is one document. Joining a file's documents gives back the file exactly.
  jsonl   JSON-lines files (`data.*_paths`); each non-blank line is an object whose
          `data.text_field` holds the document.
  hf      Hugging Face `datasets`: a directory written by `save_to_disk` (`data.hf_path`), a hub
          dataset (`data.hf_name`, `data.hf_config`, streamed), or local files read by one of
          datasets' file builders (`data.hf_name` = parquet | json | arrow | text | csv, with
          `data.hf_data_files` listing files or globs; they form the "train" split). For this
          kind the `data.*_paths` lists hold split *names* (train defaults to "train").
  stdlib  the running interpreter's standard-library `.py` files (about 31 MB with its test
          suites; `data.stdlib_tests=False` leaves those out), plus the installed site-packages
          sources with `data.stdlib_site_packages=True` (about 140 MB more in this project's
          venv): a corpus that needs no network and no download, deduplicated by content and
          split into train/valid/test by a hash of each file's relative path.

Every kind offers two functions of (cfg_data, split), cfg_data being a config's data section
(or a dict of some of its fields, the rest from the schema: `schema.data_section`): `documents`
yields the text, `describe` returns a JSON-able identity of the input (paths, sizes, sha256) that
`prepare` stores in the manifest and compares before resuming an interrupted run. `documents(..., shard=(i, n))` yields
the share of job i of n: a Hugging Face stream's files i, i + n, ... (so a job reads only its
files), else every n-th document. The iterator `documents` returns has `state()`, a JSON-able
position that `documents(..., resume=state)` continues from: a streamed Hugging Face dataset's
own `state_dict` (so a resumed job does not download what it has already read), else a count of
documents to skip.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Iterator

from structffn_jax import schema
from structffn_jax.schema import SOURCES

SPLITS = ('train', 'valid', 'test')

# Fractions of stdlib files (by hash of relative path) held out for validation and test.
STDLIB_VALID_FRACTION = 0.02
STDLIB_TEST_FRACTION = 0.02
# Directory names never entered: installed packages (a root of their own) and bytecode caches.
_STDLIB_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})
# The standard library's own test suites, left out with `data.stdlib_tests=False`.
_STDLIB_TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})
# The root label of the installed packages' sources (`data.stdlib_site_packages=True`).
SITE_PACKAGES = 'site-packages'

# datasets' builders for local files, usable as data.hf_name with data.hf_data_files.
HF_FILE_BUILDERS = ('parquet', 'json', 'arrow', 'text', 'csv')

# A WikiText top-level heading: " = Title = " (sub-headings look like " = = Section = = ").
_WIKITEXT_TITLE = re.compile(r'^ = [^=].* = $')


def paths_field(split: str) -> str:
  """The config field that lists a split's inputs, for error messages: 'data.train_paths'."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return f'data.{split}_paths'


def split_inputs(cfg_data: Any, split: str) -> list[str]:
  """The configured inputs (paths, or split names for `hf`) of one split, as a list of str."""
  cfg_data = schema.data_section(cfg_data)
  value = cfg_data[f'{split}_paths'] or []
  if isinstance(value, (str, Path)):
    value = [value]
  inputs = [str(v) for v in value]
  if not inputs and split == 'train' and cfg_data.source == 'hf':
    inputs = ['train']
  return inputs


def available_splits(cfg_data: Any) -> list[str]:
  """Splits this config provides: all three for `stdlib`, else those with configured inputs."""
  cfg_data = schema.data_section(cfg_data)
  source = _source(cfg_data)
  if source == 'stdlib':
    return list(SPLITS)
  return [s for s in SPLITS if split_inputs(cfg_data, s)]


def _source(cfg_data: Any) -> str:
  source = cfg_data.source
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not one of {SOURCES}')
  return source


def documents(cfg_data: Any,
              split: str,
              shard: tuple[int, int] = (0, 1),
              resume: dict | None = None) -> 'Documents':
  """The documents of `split` ('train' | 'valid' | 'test') for the configured source.

  `shard=(i, n)`: only job i's share of n (see the module docstring); (0, 1) is everything.
  `resume`: a `state()` of an earlier iterator over the same documents, to continue after it.
  """
  cfg_data = schema.data_section(cfg_data)
  index, count = int(shard[0]), int(shard[1])
  if not 0 <= index < count:
    raise ValueError(f'data.shard={index} outside [0, data.num_shards={count})')
  source = _source(cfg_data)
  if source == 'hf':
    inputs = split_inputs(cfg_data, split)
    if not inputs:
      raise ValueError(f'split {split!r} has no inputs: set {paths_field(split)}')
    return hf_documents(
        name=cfg_data.hf_name,
        config=cfg_data.hf_config,
        path=cfg_data.hf_path,
        data_files=cfg_data.hf_data_files,
        splits=inputs,
        text_field=_text_field(cfg_data),
        shard=(index, count),
        resume=resume,
    )
  docs = _local_documents(cfg_data, split, source)
  return Documents(docs if count == 1 else itertools.islice(docs, index, None, count), resume)


class Documents:
  """An iterator of documents that knows its position: `state()` (see the module docstring)."""

  def __init__(self, docs: Iterable[str], resume: dict | None = None):
    self.read = int(resume['docs']) if resume else 0
    self._it = itertools.islice(docs, self.read, None) if self.read else iter(docs)

  def __iter__(self) -> 'Documents':
    return self

  def __next__(self) -> str:
    doc = next(self._it)
    self.read += 1
    return doc

  def state(self) -> dict[str, Any]:
    """Where the iteration stands: after the first `docs` documents."""
    return {'docs': self.read}


def _local_documents(cfg_data: Any, split: str, source: str) -> Iterator[str]:
  if source == 'stdlib':
    return stdlib_documents(split, **_stdlib_options(cfg_data))
  inputs = split_inputs(cfg_data, split)
  if not inputs:
    raise ValueError(f'split {split!r} has no inputs: set {paths_field(split)}')
  field = paths_field(split)
  if source == 'text':
    return text_documents(inputs, field=field)
  return jsonl_documents(inputs, _text_field(cfg_data), field=field)


def _text_field(cfg_data: Any) -> str:
  """`data.text_field`; an empty one (refused by config.validate for jsonl) reads 'text'."""
  return cfg_data.text_field or 'text'


def describe(cfg_data: Any, split: str) -> dict[str, Any]:
  """A JSON-able identity of `split`'s input, checked for existence (raises if a file is missing).

  Files are identified by resolved path, size and sha256, so that an edited input is noticed.
  """
  cfg_data = schema.data_section(cfg_data)
  source = _source(cfg_data)
  if source == 'stdlib':
    options = _stdlib_options(cfg_data)
    files = stdlib_files(split, **options)
    digest = hashlib.sha256()
    for key, size in files:
      digest.update(f'{key}\0{size}\n'.encode())
    return {
        'kind': 'stdlib',
        'roots': {
            label: str(path) for label, path in corpus_roots(options['site_packages']).items()
        },
        'python': sys.version.split()[0],
        **options,
        'files': len(files),
        'bytes': sum(size for _, size in files),
        'listing_sha256': digest.hexdigest(),
        'file_list': [key for key, _ in files],
    }
  inputs = split_inputs(cfg_data, split)
  field = paths_field(split)
  if not inputs:
    raise ValueError(f'split {split!r} has no inputs: set {field}')
  if source in ('text', 'jsonl'):
    desc: dict[str, Any] = {'kind': source, 'files': [_describe_file(p, field) for p in inputs]}
    if source == 'jsonl':
      desc['text_field'] = _text_field(cfg_data)
    return desc
  hf_path = cfg_data.hf_path
  desc = {
      'kind': 'hf',
      'splits': inputs,
      'text_field': _text_field(cfg_data),
  }
  data_files = cfg_data.hf_data_files
  if hf_path:
    root = Path(hf_path).expanduser().resolve()
    if not root.is_dir():
      raise FileNotFoundError(f'data.hf_path={hf_path!r}: no such directory ({root})')
    digest = hashlib.sha256()
    for meta in sorted(root.rglob('*.json')):
      digest.update(str(meta.relative_to(root)).encode() + b'\0' + meta.read_bytes())
    desc.update(path=str(root), metadata_sha256=digest.hexdigest())
  elif data_files:
    # Paths, sizes and modification times: hashing hundreds of GB of shards would take longer
    # than a resume saves.
    files = [Path(f) for f in hf_data_file_list(data_files)]
    desc.update(
        builder=cfg_data.hf_name,
        files=[{
            'path': str(f),
            'bytes': f.stat().st_size,
            'mtime_ns': f.stat().st_mtime_ns
        } for f in files],
    )
  else:
    desc.update(
        name=cfg_data.hf_name,
        config=cfg_data.hf_config or None,
    )
  return desc


def _describe_file(path: str, field: str) -> dict[str, Any]:
  resolved = Path(path).expanduser().resolve()
  if not resolved.is_file():
    raise FileNotFoundError(f'{field}: file not found: {path!r} (resolved to {resolved})')
  try:
    digest = hashlib.sha256()
    with open(resolved, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  except OSError as e:
    raise ValueError(f'{field}: cannot read {path!r}: {e}') from e
  return {'path': str(resolved), 'bytes': resolved.stat().st_size, 'sha256': digest.hexdigest()}


# ----------------------------------------------------------------------------------------- text


def _open_text(path: str, field: str):
  resolved = Path(path).expanduser()
  if not resolved.is_file():
    raise FileNotFoundError(f'{field}: file not found: {path!r} (resolved to {resolved.resolve()})')
  try:
    # newline="" keeps "\r\n" and lone "\r" as they are, so the text round-trips byte for byte.
    return open(resolved, encoding='utf-8', newline='')
  except OSError as e:
    raise ValueError(f'{field}: cannot read {path!r}: {e}') from e


def text_documents(paths: Iterable[str], *, field: str = 'data.train_paths') -> Iterator[str]:
  """Documents of plain UTF-8 text files, in order; WikiText files split per article.

  A file's documents concatenate back to the file: text before the first title belongs to the
  first article, and each article runs up to (not including) the next title line.
  """
  for path in paths:
    with _open_text(path, field) as f:
      lines: list[str] = []
      in_article = False
      try:
        for line in f:
          if _WIKITEXT_TITLE.match(line.rstrip('\r\n')):
            if in_article:
              yield ''.join(lines)
              lines = []
            in_article = True
          lines.append(line)
      except UnicodeDecodeError as e:
        raise ValueError(f'{field}: {path!r} is not valid UTF-8 ({e})') from e
      if lines:
        yield ''.join(lines)


def jsonl_documents(paths: Iterable[str],
                    text_field: str = 'text',
                    *,
                    field: str = 'data.train_paths') -> Iterator[str]:
  """Documents of JSON-lines files: `obj[text_field]` of every non-blank line, in order."""
  for path in paths:
    with _open_text(path, field) as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{field}: {path}:{lineno} is not valid JSON ({e.msg})') from e
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
          keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
          raise ValueError(
              f'{path}:{lineno} has no string field {text_field!r} (set data.text_field to the '
              f'field that holds the text; keys present: {keys})')
        yield obj[text_field]


# ------------------------------------------------------------------------------- Hugging Face


def _import_datasets():
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "data.source='hf' needs the Hugging Face `datasets` package: pip install datasets") from e
  return datasets


def hf_data_file_list(data_files: Any) -> list[str]:
  """`data.hf_data_files` (a path, glob, or list of them) as a sorted list of existing files."""
  patterns = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
  files = []
  for pattern in patterns:
    found = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
    found = [f for f in found if Path(f).is_file()]
    if not found:
      raise FileNotFoundError(f'data.hf_data_files: no file matches {str(pattern)!r}')
    files += [str(Path(f).resolve()) for f in found]
  return files


def _hf_error(name: str, e: Exception) -> ValueError:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ''
  return ValueError(
      f'data.hf_name={name!r}: cannot open the dataset ({type(e).__name__}: {first}); check the '
      'name, data.hf_config and network access, or use data.hf_path / data.hf_data_files')


def hf_documents(
    *,
    name: str = '',
    config: str = '',
    path: str = '',
    data_files: Any = (),
    splits: Iterable[str],
    text_field: str = 'text',
    shard: tuple[int, int] = (0, 1),
    resume: dict | None = None,
) -> Documents:
  """Documents of Hugging Face dataset splits, concatenated in the order of `splits`.

  `path` (a `save_to_disk` directory) wins over `name` (a hub dataset, or with `data_files` one
  of `HF_FILE_BUILDERS`; streamed, so nothing is downloaded or converted in full). A saved single
  `Dataset` (not a `DatasetDict`) serves only split "train". `shard=(i, n)`: job i's share, by
  files where the stream has at least n of them (`datasets.distributed.split_dataset_by_node`).
  `resume`: a `state()` of an earlier iterator; a stream continues from its dataset's state.
  """
  datasets = _import_datasets()
  splits = list(splits)
  index, count = shard
  if path:
    root = Path(path).expanduser()
    if not root.is_dir():
      raise FileNotFoundError(f'data.hf_path={path!r}: no such directory ({root.resolve()})')
    saved = datasets.load_from_disk(str(root))
    parts = []
    for split in splits:
      if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
          raise ValueError(f'data.hf_path={path!r} has splits {sorted(saved)}, not {split!r}')
        parts.append(saved[split])
      elif split == 'train':
        parts.append(saved)
      else:
        raise ValueError(
            f'data.hf_path={path!r} holds a single Dataset; split {split!r} needs a DatasetDict')
    if count > 1:
      parts = [p.shard(num_shards=count, index=index, contiguous=True) for p in parts]
  else:
    if not name:
      raise ValueError("data.source='hf' needs data.hf_name (a hub dataset) or data.hf_path")
    kwargs: dict[str, Any] = {}
    if data_files:
      if name not in HF_FILE_BUILDERS:
        raise ValueError(
            f'data.hf_data_files needs data.hf_name to be one of {HF_FILE_BUILDERS}, not {name!r}')
      kwargs['data_files'] = {'train': hf_data_file_list(data_files)}
    parts = []
    for s in splits:
      try:
        parts.append(datasets.load_dataset(name, config or None, split=s, streaming=True, **kwargs))
      except (ImportError, KeyboardInterrupt):
        raise
      except Exception as e:  # pylint: disable=broad-except  # hub, network and builder errors
        raise _hf_error(name, e) from e
    if count > 1:
      import datasets.distributed  # pylint: disable=import-outside-toplevel
      parts = [
          datasets.distributed.split_dataset_by_node(p, rank=index, world_size=count) for p in parts
      ]
  return _HFDocuments(splits, parts, text_field, streaming=not path, resume=resume)


class _HFDocuments(Documents):
  """Documents of Hugging Face splits; a streamed one resumes from the dataset's `state_dict`."""

  def __init__(self, splits, parts, text_field: str, *, streaming: bool, resume: dict | None):
    self.splits, self.parts, self.text_field = list(splits), list(parts), text_field
    self.streaming, self.part, skip = streaming, 0, 0
    self.read = int(resume['docs']) if resume else 0
    if resume and streaming and 'dataset' in resume:
      self.part = int(resume['part'])
      self.parts[self.part].load_state_dict(resume['dataset'])
    else:
      skip = self.read
    self._it = itertools.islice(self._examples(), skip, None) if skip else self._examples()

  def _examples(self) -> Iterator[str]:
    for k in range(self.part, len(self.parts)):
      self.part = k
      for example in self.parts[k]:
        if self.text_field not in example:
          raise ValueError(f'hf split {self.splits[k]!r} has no field {self.text_field!r} (set '
                           f'data.text_field; fields: {sorted(example)})')
        yield example[self.text_field]

  def state(self) -> dict[str, Any]:
    out = {'docs': self.read}
    if self.streaming:
      out.update(part=self.part, dataset=self.parts[self.part].state_dict())
    return out


# ------------------------------------------------------------------------------------- stdlib


def stdlib_root() -> Path:
  """The directory of the running interpreter's standard library."""
  return Path(sysconfig.get_paths()['stdlib']).resolve()


def site_packages_root() -> Path:
  """The running environment's directory of installed pure-Python packages (its site-packages)."""
  return Path(sysconfig.get_paths()['purelib']).resolve()


def stdlib_split_of(relative_path: str) -> str:
  """'train' | 'valid' | 'test' for a corpus file, from a hash of its key (its relative path).

  Depends only on the path, so a file stays in its split across runs and Python patch versions.
  """
  u = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], 'big') / 2**64
  if u < STDLIB_VALID_FRACTION:
    return 'valid'
  if u < STDLIB_VALID_FRACTION + STDLIB_TEST_FRACTION:
    return 'test'
  return 'train'


def corpus_roots(site_packages: bool = False) -> dict[str, Path]:
  """{label: directory} of the code corpus: the stdlib, and site-packages when asked for."""
  roots = {'stdlib': stdlib_root()}
  if site_packages:
    roots[SITE_PACKAGES] = site_packages_root()
  return roots


def _key(label: str, relative: str) -> str:
  """A file's corpus key: its stdlib-relative path, or 'site-packages/<path>' for a package."""
  return relative if label == 'stdlib' else f'{label}/{relative}'


def _path_of(key: str, roots: dict[str, Path]) -> Path:
  label, sep, rest = key.partition('/')
  if sep and label in roots and label != 'stdlib':
    return roots[label] / rest
  return roots['stdlib'] / key


@functools.lru_cache(maxsize=4)
def _corpus_listing(tests: bool, site_packages: bool) -> tuple[tuple[str, int], ...]:
  """(key, size) of every corpus `.py` file, sorted by key, one file per distinct content.

  The stdlib is walked first, then site-packages; of files with identical bytes only the first
  is kept (its key decides the split), so no text appears twice in the corpus or in two splits.
  """
  skip = _STDLIB_SKIP_DIRS | (frozenset() if tests else _STDLIB_TEST_DIRS)
  seen: set[bytes] = set()
  found = []
  for label, root in corpus_roots(site_packages).items():
    if not root.is_dir():
      raise FileNotFoundError(f"data.source='stdlib': {label} directory not found at {root}")
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in skip)  # Prune, don't descend.
      for name in filenames:
        path = Path(dirpath) / name
        if name.endswith('.py') and path.is_file():
          entries.append(path.relative_to(root).as_posix())
    for rel in sorted(entries):
      try:
        content = (root / rel).read_bytes()
      except OSError:
        continue
      digest = hashlib.sha256(content).digest()
      if digest in seen:
        continue
      seen.add(digest)
      found.append((_key(label, rel), len(content)))
  return tuple(sorted(found))


def stdlib_files(
    split: str,
    max_bytes: int = 0,
    *,
    tests: bool = True,
    site_packages: bool = False,
) -> list[tuple[str, int]]:
  """(key, size in bytes) of the corpus `.py` files in `split`, capped at `max_bytes` (0: none).

  Files are ordered by a hash of their key (a fixed pseudo-random order, so that a cap keeps a
  sample of the whole library rather than its alphabetically first packages) and taken in that
  order, skipping any that would push the total past `max_bytes`. `tests` keeps the standard
  library's own test suites; `site_packages` adds the installed packages' sources.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  candidates = [(key, size)
                for key, size in _corpus_listing(bool(tests), bool(site_packages))
                if stdlib_split_of(key) == split]
  candidates.sort(key=lambda item: (hashlib.sha256(b'order:' + item[0].encode()).digest(), item[0]))
  if max_bytes <= 0:
    return candidates
  chosen, total = [], 0
  for key, size in candidates:
    if total + size <= max_bytes:
      chosen.append((key, size))
      total += size
  return chosen


def stdlib_documents(
    split: str,
    max_bytes: int = 0,
    *,
    tests: bool = True,
    site_packages: bool = False,
) -> Iterator[str]:
  """The text of each file from `stdlib_files(...)`, one document per file.

  A file that is not valid UTF-8 is skipped (which ones is fixed for a given interpreter, so the
  corpus stays deterministic); empty files yield empty documents, which tokenization skips.
  """
  roots = corpus_roots(site_packages)
  for key, _ in stdlib_files(split, max_bytes, tests=tests, site_packages=site_packages):
    try:
      with open(_path_of(key, roots), encoding='utf-8', newline='') as f:
        yield f.read()
    except (UnicodeDecodeError, OSError):
      continue


def _stdlib_options(cfg_data: Any) -> dict[str, Any]:
  """The stdlib source's settings from the data config: cap, test suites, site-packages."""
  return {
      'max_bytes': int(cfg_data.stdlib_max_bytes),
      'tests': bool(cfg_data.stdlib_tests),
      'site_packages': bool(cfg_data.stdlib_site_packages),
  }
