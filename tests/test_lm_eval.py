"""The lm-evaluation-harness adapter on small local tasks (task YAMLs over generated jsonl files,
offline): the harness's scores against scores computed here from the model's own logits, one
unpadded sequence at a time in float64 numpy; then the command on a trained run.

The model's parameters are random at a scale that gives peaked logits (as in test_generate.py), so
that a wrong mask, position or window changes a score visibly.
"""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

harness = pytest.importorskip('lm_eval', reason="lm-evaluation-harness is not installed "
                              "(pip install -e '.[eval]')")

from structffn_jax import lm_eval as adapter  # noqa: E402
from structffn_jax import train  # noqa: E402
from structffn_jax.data.manifest import Manifest  # noqa: E402
from tests import test_export, tiny_setup  # noqa: E402

SEQ_LEN = 48
WORDS = ('the game was released in 1996 , and it sold well . the album reached number one on '
         'the chart after its first week , and the band toured europe with it .').split()


random_model = tiny_setup.random_model


_forward = nnx.jit(lambda model, tokens: model(tokens))


class Reference:
  """Scores from full forwards of one sequence each (right-padded to seq_len, which causality
  makes irrelevant; checked in test_generate.py), log-softmax in float64."""

  def __init__(self, model, tok, eos):
    self.model, self.tok, self.eos = model, tok, eos

  def logprobs(self, inputs):
    buf = np.zeros((1, SEQ_LEN), np.int32)
    buf[0, :len(inputs)] = inputs
    logits = np.asarray(_forward(self.model, jnp.asarray(buf))[0, :len(inputs)], np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

  def continuation(self, context, continuation):
    """log p(continuation | context), the continuation's tokens being those of the whole text
    past the context's own tokens; an empty context is the EOS."""
    if context:
      whole = self.tok.encode(context + continuation)
      n = len(self.tok.encode(context))
    else:
      whole, n = [self.eos] + self.tok.encode(continuation), 1
    assert len(whole) <= SEQ_LEN + 1
    lp = self.logprobs(whole[:-1])
    return sum(lp[i - 1, whole[i]] for i in range(n, len(whole)))

  def document(self, text):
    """Sum of log p(token) over the document in disjoint chunks of seq_len tokens: the first
    after an EOS, each later one with the seq_len tokens before its end as context."""
    ids = self.tok.encode(text)
    total, done = 0.0, 0
    while done < len(ids):
      end = min(done + SEQ_LEN, len(ids))
      seq = ([self.eos] + ids)[max(0, end - SEQ_LEN):end + 1]  # predicts ids[end - len + 1:end]
      lp = self.logprobs(seq[:-1])
      total += sum(lp[j, seq[j + 1]] for j in range(len(seq) - 1 - (end - done), len(seq) - 1))
      done = end
    return total

  def greedy(self, prompt, new):
    seq = self.tok.encode(prompt)
    assert len(seq) + new <= SEQ_LEN  # no truncation of the prompt
    out = []
    for _ in range(new):
      token = int(np.argmax(self.logprobs(seq)[-1]))
      if token == self.eos:
        break
      seq.append(token)
      out.append(token)
    return self.tok.decode(out)


@pytest.fixture(scope='module')
def setup(data_dir):
  manifest = Manifest.load(data_dir)
  tok = manifest.load_tokenizer()
  cfg = tiny_setup.run_config(f'model.seq_len={SEQ_LEN}', method='blockshuffle', sgt=0).model
  assert cfg.vocab_size >= manifest.vocab_size
  model = random_model(cfg, seed=3)
  return model, tok, manifest.eos_id, Reference(model, tok, manifest.eos_id)


def phrase(rng, n):
  return ' '.join(rng.choice(WORDS, n))


def write_task(folder, name, docs, spec):
  """A harness task `name` over `docs` as a local jsonl (cache inside `folder`: offline)."""
  data = folder / f'{name}.jsonl'
  data.write_text(''.join(json.dumps(d) + '\n' for d in docs))
  lines = [f'task: {name}', 'dataset_path: json', 'dataset_kwargs:',
           f'  data_files: {{test: "{data}"}}', f'  cache_dir: "{folder / "hf_cache"}"',
           'test_split: test', *spec]
  (folder / f'{name}.yaml').write_text('\n'.join(lines) + '\n')


def test_scores_match_the_models_own_logits(setup, tmp_path):
  model, tok, eos, ref = setup
  rng = np.random.default_rng(0)
  # Multiple choice: 4 choices of different lengths; acc and acc_norm from reference scores.
  choice_docs, expect_acc, expect_norm = [], [], []
  for i in range(6):
    doc = {'question': phrase(rng, 2 + i % 3), 'choices': [phrase(rng, n) for n in (1, 2, 3, 1)],
           'label': int(rng.integers(4))}
    lls = np.array([ref.continuation(doc['question'], ' ' + c) for c in doc['choices']])
    chars = np.array([len(c) for c in doc['choices']], float)
    expect_acc.append(int(np.argmax(lls)) == doc['label'])
    expect_norm.append(int(np.argmax(lls / chars)) == doc['label'])
    choice_docs.append(doc)
  assert 0 < np.mean(expect_acc) < 1 or 0 < np.mean(expect_norm) < 1  # not all alike
  write_task(tmp_path, 'tiny_choice', choice_docs, [
      'output_type: multiple_choice', 'doc_to_text: "{{question}}"',
      'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"', 'metric_list:',
      '  - metric: acc', '  - metric: acc_norm'])
  # Rolling log-likelihood: documents of 1 to 4 windows of seq_len tokens.
  texts = [phrase(rng, n) for n in (3, 20, 60)]
  assert max(len(tok.encode(t)) for t in texts) > 2 * SEQ_LEN
  ll = np.array([ref.document(t) for t in texts])
  words = sum(len(re.split(r'\s+', t)) for t in texts)
  chars = sum(len(t.encode()) for t in texts)
  write_task(tmp_path, 'tiny_rolling', [{'text': t} for t in texts], [
      'output_type: loglikelihood_rolling', 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
      'metric_list:', '  - metric: word_perplexity', '  - metric: bits_per_byte'])
  # Greedy generation until a newline: half the answers are the reference's greedy text.
  prompts = [phrase(rng, n) for n in (2, 4, 7, 3)]
  greedy = [ref.greedy(p, 6).split('\n')[0] for p in prompts]
  answers = [g if i % 2 == 0 else g + ' extra' for i, g in enumerate(greedy)]
  write_task(tmp_path, 'tiny_gen', [{'prompt': p, 'answer': a} for p, a in zip(prompts, answers)], [
      'output_type: generate_until', 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{answer}}"',
      'generation_kwargs:', '  until: ["\\n"]', '  max_gen_toks: 6', '  do_sample: false',
      'metric_list:', '  - metric: exact_match'])

  lm = adapter.StructFFNLM(model, tok, eos, batch_size=4)  # batches mix lengths and tasks
  manager = adapter.task_manager(str(tmp_path), include_defaults=False)
  out = harness.simple_evaluate(model=lm, tasks=['tiny_choice', 'tiny_rolling', 'tiny_gen'],
                                task_manager=manager, bootstrap_iters=0, log_samples=False)
  r = out['results']
  assert r['tiny_choice']['acc,none'] == pytest.approx(np.mean(expect_acc))
  assert r['tiny_choice']['acc_norm,none'] == pytest.approx(np.mean(expect_norm))
  assert r['tiny_rolling']['word_perplexity,none'] == pytest.approx(math.exp(-ll.sum() / words),
                                                                    rel=1e-4)
  assert r['tiny_rolling']['bits_per_byte,none'] == pytest.approx(
      -ll.sum() / chars / math.log(2), rel=1e-5)
  assert r['tiny_gen']['exact_match,none'] == 0.5

  # The log-likelihoods themselves, batched and padded, against the reference one by one.
  pairs = [(d['question'], ' ' + c) for d in choice_docs for c in d['choices']]
  requests = [harness.api.instance.Instance('loglikelihood', {}, p, 0) for p in pairs]
  got = lm.loglikelihood(requests)
  np.testing.assert_allclose([g for g, _ in got], [ref.continuation(*p) for p in pairs],
                             rtol=2e-5, atol=1e-4)
  rolling = lm.loglikelihood_rolling(
      [harness.api.instance.Instance('loglikelihood_rolling', {}, (t,), 0) for t in texts])
  np.testing.assert_allclose(rolling, ll, rtol=2e-5)


class ExportedLM(harness.api.model.TemplateLM):
  """What the harness's Hugging Face model (`--model hf`, lm_eval/models/huggingface.py) does with
  a directory written by structffn_jax.export, without torch: the tokenizer is the exported
  tokenizer.json as `tokenizers` reads it (what transformers' PreTrainedTokenizerFast wraps) and
  its default encode; the prefix token is the tokenizer_config's BOS (HFLM.prefix_token_id); the
  max length is config.json's max_position_embeddings; the forward is the exported
  architecture's in float64 numpy (test_export.hf_forward), one request at a time."""

  def __init__(self, out):
    super().__init__()
    import tokenizers
    self.out = out
    self.tok = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
    special = json.loads((out / 'tokenizer_config.json').read_text())
    self.bos = self.tok.token_to_id(special['bos_token'])
    self.eos = self.tok.token_to_id(special['eos_token'])
    self.max_length = json.loads((out / 'config.json').read_text())['max_position_embeddings']

  @property
  def eot_token_id(self):
    return self.eos

  @property
  def prefix_token_id(self):
    return self.bos

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    return self.tok.encode(string, add_special_tokens=add_special_tokens is not False).ids

  def _loglikelihood_tokens(self, requests, disable_tqdm=False):
    out = []
    for _, context_enc, continuation_enc in requests:
      inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
      logits = test_export.hf_forward(self.out, np.asarray([inp]))[0]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      n = len(continuation_enc)
      rows = np.arange(len(inp) - n, len(inp))
      out.append((float(logp[rows, continuation_enc].sum()),
                  bool((logp[rows].argmax(-1) == continuation_enc).all())))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    totals = []
    for (string,) in [r.args for r in requests]:
      windows = [harness.utils.make_disjoint_window(w) for w in harness.utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)]
      totals.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None,) + w for w in windows])))
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    raise NotImplementedError


def test_exported_model_scores_as_ours_under_the_harness_hf_convention(setup, data_dir, tmp_path):
  """A default `--model hf` evaluation of the export (its tokenizer.json, its BOS as the prefix
  token, its weights in the transformers architecture) gives our adapter's scores, on a rolling
  task and a multiple-choice one with empty and non-empty contexts."""
  export = pytest.importorskip('structffn_jax.export')
  pytest.importorskip('safetensors')
  model, tok, eos, _ = setup
  manifest = Manifest.load(data_dir)
  out = export.export_model(model, tmp_path / 'hf', eos_id=eos,
                            tokenizer_path=manifest.tokenizer_path)
  rng = np.random.default_rng(5)
  texts = [phrase(rng, n) for n in (4, 25, 70)]
  assert max(len(tok.encode(t)) for t in texts) > 2 * SEQ_LEN
  write_task(tmp_path, 'tiny_rolling', [{'text': t} for t in texts], [
      'output_type: loglikelihood_rolling', 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
      'metric_list:', '  - metric: word_perplexity', '  - metric: bits_per_byte'])
  docs = [{'question': phrase(rng, 3) if i % 3 else '', 'choices': [phrase(rng, n) for n in (1, 3)],
           'label': i % 2} for i in range(6)]
  write_task(tmp_path, 'tiny_choice', docs, [
      'output_type: multiple_choice', 'doc_to_text: "{{question}}"', 'target_delimiter: ""',
      'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"', 'metric_list:',
      '  - metric: acc'])
  manager = adapter.task_manager(str(tmp_path), include_defaults=False)
  ours_lm, theirs_lm = adapter.StructFFNLM(model, tok, eos, batch_size=4), ExportedLM(out)
  kwargs = dict(tasks=['tiny_rolling', 'tiny_choice'], task_manager=manager, bootstrap_iters=0,
                log_samples=True)
  ours = harness.simple_evaluate(model=ours_lm, **kwargs)
  theirs = harness.simple_evaluate(model=theirs_lm, **kwargs)
  for metric in ('bits_per_byte,none', 'word_perplexity,none'):
    assert ours['results']['tiny_rolling'][metric] == pytest.approx(
        theirs['results']['tiny_rolling'][metric], rel=1e-5)
  assert ours['results']['tiny_choice']['acc,none'] == theirs['results']['tiny_choice']['acc,none']
  # Request by request: the same log-likelihoods.
  def lls(samples):  # rolling: resps [[ll]]; multiple choice: [[(ll, is_greedy)], ...]
    return [float(np.ravel(np.asarray(r[0], dtype=object))[0]) for s in samples for r in s['resps']]
  for task in ('tiny_rolling', 'tiny_choice'):
    np.testing.assert_allclose(lls(ours['samples'][task]), lls(theirs['samples'][task]),
                               rtol=2e-5, atol=1e-4)
  pairs = [(d['question'], c) for d in docs for c in d['choices']]
  assert any(not q for q, _ in pairs)
  for q, c in pairs:
    assert ours_lm._pair(q, c) == theirs_lm._encode_pair(q, c) if q else \
        ours_lm._pair(q, c) == ([theirs_lm.prefix_token_id], theirs_lm.tok_encode(c))


def test_unknown_task_is_a_one_line_error(tmp_path):
  manager = adapter.task_manager(str(tmp_path), include_defaults=False)
  with pytest.raises(ValueError, match=r"no lm-eval task named 'no_such_task'"):
    adapter.check_tasks(['no_such_task'], manager)


def test_command_writes_results_next_to_the_run(trained_workdir, tmp_path, capsys):
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  write_task(tasks, 'tiny_choice', [
      {'question': 'the game was', 'choices': ['released', 'album'], 'label': 0},
      {'question': 'the band', 'choices': ['toured', 'week'], 'label': 1}], [
          'output_type: multiple_choice', 'doc_to_text: "{{question}}"',
          'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"', 'metric_list:',
          '  - metric: acc'])
  args = ['--workdir', str(trained_workdir), '--include-path', str(tasks), '--batch-size', '2']
  adapter.main(args + ['--tasks', 'tiny_choice'])
  out, err = capsys.readouterr()
  path = trained_workdir / 'lm_eval' / 'step2_tiny_choice.json'
  record = json.loads(path.read_text())
  assert record['step'] == 2 and record['tasks'] == ['tiny_choice']
  acc = record['results']['tiny_choice']['acc,none']
  assert acc in (0.0, 0.5, 1.0)
  assert re.search(rf'tiny_choice\s+acc\s+{acc:.4f}', out) and str(path) in err
  with pytest.raises(SystemExit, match=r"^error: --tasks: no lm-eval task named 'nope'"):
    adapter.main(args + ['--tasks', 'tiny_choice,nope'])
  with pytest.raises(SystemExit, match='config.json not found'):
    adapter.main(['--workdir', str(tmp_path), '--tasks', 'tiny_choice'])


def test_registered_model_through_the_harness_command_line(trained_workdir, tmp_path, capsys):
  """`python -m structffn_jax.lm_eval run --model structffn ...` is the harness's command line
  with the adapter registered: its output layout, --log_samples and --use_cache, the score of
  the thin wrapper; and the same with an exported directory as `pretrained`."""
  registry = harness.api.registry
  assert registry.get_model(adapter.MODEL_NAME) is adapter.StructFFNLM
  assert 'hf' in registry.model_registry  # the harness's own models are still there
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  write_task(tasks, 'tiny_choice', [
      {'question': 'the game was', 'choices': [' released', ' album'], 'label': 0},
      {'question': 'the band', 'choices': [' toured', ' week'], 'label': 1},
      {'question': '', 'choices': ['the', 'album'], 'label': 0}], [
          'output_type: multiple_choice', 'doc_to_text: "{{question}}"', 'target_delimiter: ""',
          'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"', 'metric_list:',
          '  - metric: acc'])
  _, record = adapter.evaluate(trained_workdir, ['tiny_choice'], include_path=tasks,
                               include_defaults=False, batch_size=2, bootstrap_iters=0,
                               out=tmp_path / 'wrapper.json')
  wrapper = record['results']['tiny_choice']['acc,none']

  def run(pretrained, out):
    adapter.main(['run', '--model', 'structffn', '--model_args', f'pretrained={pretrained}',
                  '--tasks', 'tiny_choice', '--include_path', str(tasks), '--batch_size', '2',
                  '--output_path', str(out), '--log_samples', '--use_cache',
                  str(tmp_path / 'cache' / out.name)])
    results = sorted(out.rglob('results_*.json'))
    samples = sorted(out.rglob('samples_tiny_choice_*.jsonl'))
    assert len(results) == 1 and len(samples) == 1, sorted(out.rglob('*'))
    assert len(samples[0].read_text().splitlines()) == 3
    return json.loads(results[0].read_text())['results']['tiny_choice']['acc,none']

  assert run(trained_workdir, tmp_path / 'by_workdir') == wrapper
  assert list((tmp_path / 'cache').glob('by_workdir*'))  # the harness's request cache
  pytest.importorskip('safetensors')
  from structffn_jax import export
  exported = export.export_run(trained_workdir, tmp_path / 'hf')
  assert run(exported, tmp_path / 'by_export') == wrapper
  with pytest.raises(ValueError, match='give pretrained=WORKDIR_OR_EXPORT_DIR'):
    adapter.StructFFNLM.create_from_arg_string('', {'batch_size': 2})


def test_lm_eval_during_training_on_local_tasks(data_dir, tmp_path):
  """eval.lm_eval_tasks / eval.lm_eval_every: the harness runs inside the loop on the parameters
  being trained; the scores are in metrics.jsonl and TensorBoard at those steps and in run()'s
  result, and the last equal what the command gives on the final checkpoint."""
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  rng = np.random.default_rng(7)
  write_task(tasks, 'tiny_rolling', [{'text': phrase(rng, n)} for n in (5, 30)], [
      'output_type: loglikelihood_rolling', 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
      'metric_list:', '  - metric: bits_per_byte'])
  write_task(tasks, 'tiny_choice', [
      {'question': 'the game was', 'choices': [' released', ' album'], 'label': 0},
      {'question': 'the band', 'choices': [' toured', ' week'], 'label': 1}], [
          'output_type: multiple_choice', 'doc_to_text: "{{question}}"', 'target_delimiter: ""',
          'doc_to_target: "{{label}}"', 'doc_to_choice: "{{choices}}"', 'metric_list:',
          '  - metric: acc'])
  config = tiny_setup.run_config(
      'train.tokens=2048', 'train.eval_every=0', 'train.log_every=1', 'train.eval_tokens=256',
      'model.ffn.init=gaussian', f'data.data_dir={data_dir}', 'eval.lm_eval_every=2',
      'eval.lm_eval_tasks=tiny_rolling,tiny_choice', f'eval.lm_eval_include_path={tasks}',
      'eval.lm_eval_batch_size=2', sgt=0)
  workdir = tmp_path / 'w'
  result = train.Trainer(config, workdir).run()
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  scored = [r for r in records if 'lm_eval/tiny_rolling/bits_per_byte' in r]
  assert [r['step'] for r in scored] == [2, 4]  # every 2 steps; the last step once
  assert all(r['lm_eval/tiny_choice/acc'] in (0.0, 0.5, 1.0) for r in scored)
  assert scored[0]['lm_eval/tiny_rolling/bits_per_byte'] != scored[1][
      'lm_eval/tiny_rolling/bits_per_byte']  # trained in between
  assert result['lm_eval/tiny_rolling/bits_per_byte'] == scored[1][
      'lm_eval/tiny_rolling/bits_per_byte']
  events = b''.join(f.read_bytes() for f in (workdir / 'tb').rglob('events.out.tfevents.*'))
  assert b'lm_eval/tiny_rolling/bits_per_byte' in events and b'lm_eval/tiny_choice/acc' in events
  _, record = adapter.evaluate(workdir, ['tiny_rolling'], include_path=tasks, batch_size=2,
                               bootstrap_iters=0, out=tmp_path / 'after.json')
  assert record['results']['tiny_rolling']['bits_per_byte,none'] == pytest.approx(
      scored[1]['lm_eval/tiny_rolling/bits_per_byte'], rel=1e-6)
  bad = tiny_setup.run_config(f'data.data_dir={data_dir}', 'eval.lm_eval_tasks=nope',
                              f'eval.lm_eval_include_path={tasks}', sgt=0)
  with pytest.raises(ValueError, match="eval.lm_eval_tasks: no lm-eval task named 'nope'"):
    train.Trainer(bad, tmp_path / 'bad').run()
