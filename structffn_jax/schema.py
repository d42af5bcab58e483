"""The config schema: every field of a run, each with its one default (`base_config`).

Config files in `configs/` start from `base_config()` and override what their paper table needs;
`structffn_jax.config` validates the result. A config read back from a workdir's config.json is
rebuilt the same way (`from_dict`), and a data section given as a plain dict (`data_section`)
takes its missing fields from here, so no other module repeats a default.

It also owns the values each field may take (`CHOICES`, `RANGES`, the tuples the layers read)
and the mesh section's checks. A leaf module (it imports only ml_collections and `errors`): the
data preparation, its worker processes and `structffn_jax.config` all read the schema without
loading JAX or a tokenizer library.
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from structffn_jax.errors import ConfigError

# ----------------------------------------------------------------------------- allowed values
# The layers, the data preparation and `config.validate` all read these; none repeats them.

# `model.ffn.method`: the FFN structures (structured.py).
METHODS = ('dense', 'lowrank', 'blockdense', 'blockshuffle')
# `model.ffn.init`: SVD / orthogonal blocks as the paper, or plain Gaussians.
INITS = ('paper', 'gaussian')
# `model.ffn.implementation`: the structured matmuls (kernels/api.py).
FFN_IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
# `model.attention.implementation` (attention.py).
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')
# `data.source`: where the documents come from (data/sources.py).
SOURCES = ('stdlib', 'text', 'jsonl', 'hf')
# `data.format`: tokenize the source text, or read token rows written elsewhere.
DATA_FORMATS = ('tokens', 'rows_bin')
# The device mesh's axes, in order (sharding.py).
MESH_AXES = ('data', 'fsdp', 'tensor')



CHOICES = {  # field -> the values it may take
    'model.norm': ('layernorm', 'rmsnorm'),
    'model.activation': ('gelu', 'swiglu'),
    'model.position': ('rope', 'absolute'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.remat': ('none', 'dots', 'full'),
    'model.rope_scaling.type': ('none', 'linear', 'llama3'),
    'model.hf_family': ('', 'llama', 'mistral', 'qwen2', 'starcoder2', 'gpt2'),
    'model.ffn.method': METHODS,
    'model.ffn.init': INITS,
    'model.ffn.implementation': FFN_IMPLEMENTATIONS,
    'model.attention.implementation': ATTENTION_IMPLEMENTATIONS,
    'sgt.mode': ('fixedstep', 'fixedflop'),
    'sgt.schedule': ('cosine', 'linear'),
    'data.source': SOURCES,
    'data.format': DATA_FORMATS,
    'data.rows_dtype': ('uint16', 'uint32'),
    'mesh.distributed': ('auto', 'on', 'off'),
}

# The largest seed: seeds are uint32 (the JAX PRNG key, the data order); train.seed + 1 seeds the
# reduce_flop draws.
SEED_MAX = 2**32 - 2

# Ranges of the numeric fields: field -> (holds(value), what it must be; how to fix it).
RANGES = {
    'model.norm_eps': (lambda v: v > 0, 'must be > 0; e.g. 1e-5'),
    'model.rope_base': (lambda v: v > 0, 'must be > 0; e.g. 10000'),
    'model.init_std': (lambda v: v > 0, 'must be > 0; e.g. 0.02'),
    'model.rope_scaling.factor': (lambda v: v > 0, 'must be > 0; e.g. 8.0'),
    'model.rope_scaling.low_freq_factor': (lambda v: v > 0, 'must be > 0; e.g. 1.0'),
    'model.rope_scaling.high_freq_factor': (lambda v: v > 0, 'must be > 0; e.g. 4.0'),
    'model.rope_scaling.original_len': (lambda v: v >= 1, 'must be >= 1; e.g. 8192'),
    'model.ffn.rank': (lambda v: v >= 0, 'must be >= 0 (0 for dense and blockshuffle)'),
    'model.ffn.blocks': (lambda v: v >= 1, 'must be >= 1 (1 for dense and lowrank)'),
    'model.ffn.merge_threshold': (lambda v: v >= -1,
                                  'must be -1 (premerge.json), 0 (off) or a token count'),
    'sgt.ratio': (lambda v: 0 < v <= 1, 'must be in (0, 1]: G as a fraction of S'),
    'train.tokens': (lambda v: v > 0, 'must be > 0; the token budget, e.g. 2.2e9'),
    'train.global_batch': (lambda v: v >= 1, 'must be >= 1 sequence per step'),
    'train.micro_batch': (lambda v: v >= 0, 'must be >= 0 (0 = global_batch)'),
    'train.peak_lr': (lambda v: v > 0, 'must be > 0; e.g. 6e-4'),
    'train.warmup_frac': (lambda v: 0 <= v < 1, 'must be in [0, 1): a fraction of the steps'),
    'train.min_lr_ratio': (lambda v: 0 <= v <= 1, 'must be in [0, 1]: a fraction of peak_lr'),
    'train.b1': (lambda v: 0 <= v < 1, 'must be in [0, 1); e.g. 0.9'),
    'train.b2': (lambda v: 0 <= v < 1, 'must be in [0, 1); e.g. 0.999'),
    'train.weight_decay': (lambda v: v >= 0, 'must be >= 0; e.g. 0.1'),
    'train.grad_clip': (lambda v: v > 0, 'must be > 0 (a global-norm bound); e.g. 1.0'),
    'train.seed': (lambda v: 0 <= v <= SEED_MAX, f'must be in [0, {SEED_MAX}] (uint32, the '
                   'JAX and data-order seeds)'),
    'train.data_start': (lambda v: v >= 0, 'must be >= 0: a global batch index'),
    'train.data_seed': (lambda v: -1 <= v <= SEED_MAX,
                        f'must be in [0, {SEED_MAX}] (uint32), or -1 for train.seed'),
    'train.eval_tokens': (lambda v: v >= 0, 'must be >= 0 tokens'),
    'train.eval_every': (lambda v: v >= 0, 'must be >= 0 steps (0 = only at the end)'),
    'train.eval_batch': (lambda v: v >= 0, 'must be >= 0 (0 = micro_batch or global_batch)'),
    'eval.lm_eval_every': (lambda v: v >= 0, 'must be >= 0 steps (0 = only at the end)'),
    'eval.lm_eval_limit': (lambda v: v >= 0, 'must be >= 0 (0 = all; < 1 = a fraction)'),
    'eval.lm_eval_batch_size': (lambda v: v >= 1, 'must be >= 1 request per forward'),
    'train.log_every': (lambda v: v >= 1, 'must be >= 1 step'),
    'train.ckpt_every': (lambda v: v >= 1, 'must be >= 1 step'),
    'train.keep_ckpts': (lambda v: v >= 1, 'must be >= 1; keep 2 or more so that a damaged '
                         'newest checkpoint can fall back to the one before'),
    'train.profile_start': (lambda v: v >= -1, 'must be >= 0, or -1 for no trace'),
    'train.profile_steps': (lambda v: v >= 1, 'must be >= 1 step'),
    'train.peak_flops': (lambda v: v >= 0, 'must be >= 0 FLOP/s (0 = look up the device)'),
    'data.vocab_size': (lambda v: v >= 2, 'must be >= 2 tokens'),
    'data.stdlib_max_bytes': (lambda v: v >= 0, 'must be >= 0 bytes (0 = no cap)'),
    'data.max_tokens': (lambda v: v >= 0, 'must be >= 0 tokens (0 = all of the input)'),
    'data.valid_tokens': (lambda v: v >= 0, 'must be >= 0 tokens (0 = data.max_tokens)'),
    'data.test_tokens': (lambda v: v >= 0, 'must be >= 0 tokens (0 = data.max_tokens)'),
    'data.valid_fraction': (lambda v: 0 <= v < 1, 'must be in [0, 1): a fraction of the train '
                            'documents'),
    'data.test_fraction': (lambda v: 0 <= v < 1, 'must be in [0, 1): a fraction of the train '
                           'documents'),
    'data.num_workers': (lambda v: v >= -1, 'must be 0 (this process), a count, or -1 (one per '
                         'CPU)'),
    'data.shard_tokens': (lambda v: v >= 1, 'must be >= 1 token per file'),
    'data.shard': (lambda v: v >= 0, 'must be >= 0: this job\'s index'),
    'data.num_shards': (lambda v: v >= 1, 'must be >= 1 job'),
}


# ----------------------------------------------------------------------------- on resume
# What a resumed run may change (workdir.py compares config.json with these):
#   'free'   how the run is carried out, not what it trains: may always change, and is not listed
#            among the changes (evaluation and logging cadence, the lm-eval tasks of eval.*,
#            memory, mesh, kernels, paths).
#   'allowed' changes how the run goes on, not the shapes of the state in its checkpoints:
#            accepted when named by `--allow-change` (name, train.*, data.*).
#   'fixed'  the state in the checkpoints depends on it (model.*, sgt.*, train.seed).
RESUME_FREE = frozenset((
    'train.eval_every', 'train.log_every', 'train.ckpt_every', 'train.keep_ckpts',
    'train.profile_start', 'train.profile_steps', 'train.peak_flops', 'train.eval_batch',
    'train.micro_batch', 'model.remat', 'data.data_dir', 'mesh.data', 'mesh.fsdp',
    'mesh.tensor', 'mesh.rules', 'mesh.distributed', 'model.ffn.merge_threshold',
    'model.ffn.implementation', 'model.attention.implementation', 'data.num_workers',
    'log.wandb', 'eval.lm_eval_tasks', 'eval.lm_eval_every', 'eval.lm_eval_limit',
    'eval.lm_eval_batch_size', 'eval.lm_eval_include_path'))
_RESUME_ALLOWED = ('name', 'train.', 'data.')  # prefixes
_RESUME_FIXED = frozenset(('train.seed',))


def resume_change(field: str) -> str:
  """'free', 'allowed' or 'fixed': whether `field` (dotted) may change when a run resumes."""
  if field in RESUME_FREE:
    return 'free'
  if field.startswith(_RESUME_ALLOWED) and field not in _RESUME_FIXED:
    return 'allowed'
  return 'fixed'


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the paper's defaults (Transformer-s, dense)."""
  c = ml_collections.ConfigDict()
  c.name = 'dense-s'  # Run name, used in logs and plots.

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 32000  # Vocabulary size (embedding rows, tied LM head).
  m.seq_len = 1024  # Context length in tokens.
  m.hidden_dim = 768  # Model width d.
  m.ffn_dim = 3072  # FFN inner width.
  m.num_layers = 12  # Transformer blocks.
  m.num_heads = 12  # Query heads.
  m.num_kv_heads = 12  # Key/value heads (grouped-query attention when < num_heads).
  m.attn_dim = 768  # Attention width (num_heads * head_dim), independent of hidden_dim.
  m.norm = 'layernorm'  # 'layernorm' or 'rmsnorm'.
  m.norm_eps = 1e-5  # Normalisation epsilon.
  m.activation = 'gelu'  # 'gelu' (tanh approximation) or 'swiglu'.
  m.use_bias = True  # Biases on every projection (and LayerNorm).
  m.qkv_bias = False  # Biases on the q/k/v projection even when use_bias is off (Qwen2).
  m.tie_embeddings = True  # LM head tied to the token embedding; False: its own (V, D) matrix.
  m.position = 'rope'  # 'rope' (rotate-half) or 'absolute' (learned).
  m.rope_base = 10000.0  # RoPE frequency base.
  r = m.rope_scaling = ml_collections.ConfigDict()  # RoPE frequency scaling (imported models).
  r.type = 'none'  # 'none', 'linear' (positions / factor) or 'llama3' (Llama 3.1 wavelength bands).
  r.factor = 1.0  # Scaling factor.
  r.low_freq_factor = 1.0  # llama3: wavelengths above original_len / low_freq_factor are scaled.
  r.high_freq_factor = 4.0  # llama3: wavelengths below original_len / high_freq_factor are kept.
  r.original_len = 8192  # llama3: the context the frequencies were trained for.
  # The Hugging Face family an imported model came from (convert sets it), which export writes;
  # '' = Starcoder2 for layernorm + gelu, Qwen2 for rmsnorm + swiglu with qkv_bias, else Llama.
  m.hf_family = ''
  m.init_std = 0.02  # Std of every Gaussian initialiser.
  m.first_layer_dense = True  # Keep the first block's FFN dense.
  m.dtype = 'bfloat16'  # Compute dtype: 'bfloat16', 'float32' or 'float16'; params are float32.
  m.remat = 'none'  # Rematerialise blocks in backward: 'none', 'dots' or 'full'.
  f = m.ffn = ml_collections.ConfigDict()
  f.method = 'dense'  # FFN structure: dense, lowrank, blockdense or blockshuffle.
  f.rank = 0  # Rank R (lowrank, blockdense).
  f.blocks = 1  # Block count C (blockdense, blockshuffle).
  f.init = 'paper'  # 'paper' (svd / orthogonal blocks) or 'gaussian'.
  f.implementation = 'auto'  # Structured matmuls: 'auto', 'xla' or 'pallas' (kernels/api.py).
  f.merge_threshold = -1  # Inference pre-merge up to this many tokens (0 off, -1 premerge.json).
  a = m.attention = ml_collections.ConfigDict()
  a.implementation = 'auto'  # 'auto' (fused on GPU, xla elsewhere), 'xla', 'cudnn', 'pallas'.

  s = c.sgt = ml_collections.ConfigDict()
  s.enabled = False  # Self-guided training: dense guide blended in over the first G steps.
  s.mode = 'fixedstep'  # 'fixedstep' (G = ratio*S inside S) or 'fixedflop' (S + G steps).
  s.ratio = 0.5  # G as a fraction of the baseline steps S.
  s.schedule = 'cosine'  # α(t) schedule: 'cosine' or 'linear'.
  s.reduce_flop = False  # Skip the guide in a layer when its draw u >= α.

  t = c.train = ml_collections.ConfigDict()
  t.tokens = 2.2e9  # Token budget of the baseline run (steps S = tokens / (batch * seq_len)).
  t.global_batch = 512  # Sequences per optimizer step.
  t.micro_batch = 0  # Sequences per device forward pass (0 = global_batch; accumulation otherwise).
  t.peak_lr = 6e-4  # Peak learning rate.
  t.warmup_frac = 0.1  # Linear warm-up as a fraction of the steps.
  t.min_lr_ratio = 0.1  # Cosine decays to this fraction of peak_lr.
  t.b1 = 0.9  # AdamW beta1.
  t.b2 = 0.999  # AdamW beta2.
  t.weight_decay = 0.1  # AdamW weight decay, on all parameters.
  t.grad_clip = 1.0  # Global gradient-norm clip.
  t.seed = 1005  # Seed for init, data order and reduce_flop draws.
  t.data_start = 0  # First global batch of the shuffled row order this run reads.
  t.data_seed = -1  # Seed of the row order (-1 = train.seed).
  t.eval_tokens = 0.5e9  # Held-out tokens for validation (capped by the split's size).
  t.eval_every = 1000  # Evaluate every this many steps (and at the end); 0 = only at the end.
  t.eval_batch = 0  # Sequences per evaluation forward pass (0 = micro_batch or global_batch).
  t.log_every = 10  # Progress line and metrics every this many steps.
  t.ckpt_every = 1000  # Checkpoint every this many steps (and at the end and on SIGTERM/SIGINT).
  t.keep_ckpts = 3  # Checkpoints kept (the newest ones).
  t.profile_start = -1  # First step of an XLA profiler trace (-1 = no trace).
  t.profile_steps = 5  # Steps in the trace, written under <workdir>/profile.
  t.peak_flops = 0.0  # Peak FLOP/s per device for the MFU estimate (0 = look up the device).

  d = c.data = ml_collections.ConfigDict()  # Text, tokenizer and token rows (data/prepare.py).
  d.source = 'stdlib'  # 'stdlib' | 'text' | 'jsonl' | 'hf'.
  d.train_paths = []  # Training files (text/jsonl/rows_bin) or split names (hf; default ['train']).
  d.valid_paths = []  # Validation files or hf split names; empty = none, or carved from train.
  d.test_paths = []  # Test files or hf split names; empty = none, or carved from train.
  d.text_field = 'text'  # Field holding the document in jsonl lines / hf examples.
  d.hf_name = ''  # Hugging Face hub dataset (streamed), or parquet|json|arrow|text|csv.
  d.hf_config = ''  # Hugging Face dataset config name, '' = none.
  d.hf_path = ''  # Directory written by `datasets.save_to_disk`; overrides hf_name.
  d.hf_data_files = []  # Local files or globs read by hf_name=parquet|json|...: the train split.
  d.tokenizer = ''  # Existing SentencePiece .model or HF tokenizer.json; '' = train one.
  d.eos_token = ''  # Token ending each document (tokenizer.json); '' = the tokenizer's usual one.
  # SentencePiece vocabulary trained when data.tokenizer is empty. It must not exceed
  # model.vocab_size (checked by config.validate); configs set it to model.vocab_size.
  d.vocab_size = m.vocab_size
  d.data_dir = ''  # Where tokenizer, token rows and manifest go; '' = <workdir>/data.
  d.stdlib_max_bytes = 0  # Cap on stdlib text per split (0 = none: about 31 MB with the tests).
  d.stdlib_tests = True  # Include the standard library's own test suites.
  d.stdlib_site_packages = False  # Add the installed site-packages sources (deduplicated).
  d.max_tokens = 0  # Cap on the tokens of each split (0 = all of the input).
  d.valid_tokens = 0  # Cap on validation tokens (0 = max_tokens); > 0 carves them if no input.
  d.valid_fraction = 0.0  # Train documents held out (by hash) for validation; 0 = from the caps.
  d.test_tokens = 0  # Cap on test tokens (0 = max_tokens); > 0 carves them if no input.
  d.test_fraction = 0.0  # Train documents held out (by hash) for test; 0 = from the caps.
  d.num_workers = 0  # Tokenizer processes: 0 = tokenize in this process, -1 = one per CPU.
  d.shard_tokens = 1 << 28  # Tokens per file of a split (268M: 512 MB of uint16 per file).
  d.shard = 0  # This job's index when preparing as data.num_shards jobs (one per host).
  d.num_shards = 1  # Jobs sharing the input; the last to finish writes the manifest.
  d.format = 'tokens'  # 'tokens': tokenize the source; 'rows_bin': data.*_paths are token rows.
  d.rows_dtype = 'uint16'  # Token type of rows_bin files ('uint16' | 'uint32').

  e = c.eval = ml_collections.ConfigDict()  # lm-eval in the training loop (lm_eval.LMEvalHook).
  e.lm_eval_tasks = ''  # Comma-separated harness task names ('' = off), e.g. 'arc_easy,piqa'.
  e.lm_eval_every = 0  # Steps between evaluations (0 = only after the last step).
  e.lm_eval_limit = 0.0  # Documents per task (0 = all; < 1 = a fraction).
  e.lm_eval_batch_size = 16  # Requests per forward pass.
  e.lm_eval_include_path = ''  # A folder of task YAMLs of your own (a local jsonl: offline).
  c.log = ml_collections.ConfigDict()  # Where metrics go besides metrics.jsonl and TensorBoard.
  c.log.wandb = ''  # Weights & Biases project ('' = off; pip install '.[wandb]').

  h = c.mesh = ml_collections.ConfigDict()  # Device mesh and sharding (structffn_jax/sharding.py).
  h.data = -1  # Data-parallel mesh axis size (-1 = the devices left over).
  h.fsdp = 1  # Fully-sharded data-parallel axis: batch and parameters' embed dim split over it.
  h.tensor = 1  # Tensor-parallel axis: mlp, heads, qkv, kv, vocab, rank, blocks split over it.
  h.rules = (  # Logical axis -> mesh axis (None: replicated); also 'embed=fsdp' strings.
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
      ('qkv', 'tensor'), ('kv', 'tensor'), ('vocab', 'tensor'), ('rank', 'tensor'),
      ('blocks', 'tensor'), ('layers', None))
  h.distributed = 'auto'  # jax.distributed.initialize: 'auto' (SLURM, TPU pod, env), 'on', 'off'.
  return c


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """`base_config()` with `values` (a config read back from JSON) set over it, field by field.

  Values take the schema's types (a JSON list becomes the tuple a field holds, an int a float
  field's float); a field the dict lacks keeps its default.
  """
  config = base_config()
  config.update(values)
  return config


def data_section(cfg_data: Any) -> ml_collections.ConfigDict:
  """The data section `cfg_data` as a complete ConfigDict: a ConfigDict from a config as it is, a
  plain dict over the schema's defaults (`base_config().data`)."""
  if isinstance(cfg_data, ml_collections.ConfigDict):
    return cfg_data
  section = base_config().data
  section.update(dict(cfg_data))
  return section


# ----------------------------------------------------------------------------- mesh section


def parse_rules(rules: Iterable) -> tuple[tuple[str, Any], ...]:
  """Normalise a rules table to ((logical, None | mesh axis | (mesh axes...)), ...).

  Entries are pairs `(logical, target)` (as in `base_config()`, or lists from config.json), or
  strings 'logical=target' (from `--set mesh.rules=embed=fsdp,mlp=tensor,batch=data+fsdp`),
  where target is a mesh axis, axes joined by '+', or 'none' / '' for replicated.
  """
  out = []
  for entry in rules:
    if isinstance(entry, str):
      logical, sep, target = entry.partition('=')
      if not sep:
        raise ConfigError(
            f'mesh.rules entry {entry!r} is not logical=mesh_axis (e.g. embed=fsdp, '
            f'batch=data+fsdp, layers=none).')
      target = target.strip()
      target = None if target.lower() in ('', 'none') else tuple(target.split('+'))
    else:
      logical, target = entry
      if isinstance(target, (list, tuple)):
        target = tuple(target) or None
    if isinstance(target, tuple) and len(target) == 1:
      target = target[0]
    for axis in (target,) if isinstance(target, str) else target or ():
      if axis not in MESH_AXES:
        raise ConfigError(
            f'mesh.rules maps {logical!r} to {axis!r}, which is not a mesh axis; use one of '
            f'{", ".join(MESH_AXES)} or None.')
    out.append((str(logical).strip(), target))
  return tuple(out)


def check_mesh_sizes(mesh: ml_collections.ConfigDict) -> dict[str, int]:
  """{axis: size} of a `mesh` section; a size that is neither positive nor -1, or two sizes of
  -1, is a ConfigError naming the field (config.validate runs this too)."""
  sizes = {a: int(mesh[a]) for a in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'mesh.{axis}={size} must be a positive size, or -1 for the '
                        f'devices left over.')
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f'mesh.{free[1]}=-1: mesh.{free[0]} is -1 too; at most one mesh size '
                      f'may be -1 (the devices left over).')
  return sizes
