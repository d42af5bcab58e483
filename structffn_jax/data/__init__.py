"""Data: text sources -> token rows on disk -> index-addressed batches.

  sources    documents from plain text / JSON lines / Hugging Face datasets / the Python stdlib
  tokenizer  SentencePiece `.model` and Hugging Face `tokenizer.json` behind one interface; the
             SentencePiece model a preparation trains
  manifest   a prepared directory read: manifest.json, the .bin shards and their size checks
             (no tokenizer library)
  prepare    the writer's entry and command line: tokenizer + sharded rows of seq_len + 1 ids +
             manifest.json, written once, by one or many jobs; a finished directory reused
  settings   what a preparation writes: input streams, carved splits, caps, the settings a
             job's files depend on
  jobs       the jobs and their records under jobs/: resume, refuse or replace an unfinished
             preparation, the tokenizer copied or trained once, the merge into the manifest
  pieces     a job's share of one stream, written and recorded piece by piece; progress lines
  encode     the writer's tokenizing half: documents to splits, ids on worker processes, rows
  rows_bin   a manifest over rows tokenized elsewhere (the authors' .bin files)
  pipeline   grain pipeline: global batch d is a pure function of d (exact resume, replay)

Names are imported on first use, so `python -m structffn_jax.data.prepare` does not load the
module twice and importing the package stays cheap.
"""

import importlib

_EXPORTS = {
    'BatchIterator': 'pipeline',
    'BatchStream': 'pipeline',
    'TokenRows': 'pipeline',
    'eval_batches': 'pipeline',
    'make_train_iterator': 'pipeline',
    'num_eval_batches': 'pipeline',
    'open_split': 'pipeline',
    'Manifest': 'manifest',
    'PendingJobs': 'jobs',
    'as_manifest': 'manifest',
    'load_tokenizer': 'prepare',
    'prepare': 'prepare',
    'resolve_data_dir': 'manifest',
    'token_dtype': 'manifest',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
