"""Every notebook in colab/ runs top to bottom (small settings injected after its parameters cell)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'colab').glob('*.ipynb'))

# Small settings per notebook, applied like papermill: a cell right after the 'parameters' cell.
CI_PARAMETERS = {
    '01_structured_layers': "BENCH_WIDTHS = (128, 256)\nBENCH_TOKENS = 512\n",
    '02_train': "STEPS = 6\nCORPUS_BYTES = 5e5\nVOCAB = 1024\nWORKROOT = {tmp!r}\n",
    "03_decode_premerge": "WIDTH = 128\nMAX_TOKENS = 32\nGEN_STEPS = 8\nITERS = 3\n",
    '04_profiling': "STEPS = 6\nPROFILE_START, PROFILE_STEPS = 3, 2\nCORPUS_BYTES = 1e6\n"
                    "WORKDIR = {tmp!r}\n",
}


def test_every_notebook_has_ci_parameters():
  assert NOTEBOOKS, 'no notebooks in colab/'
  assert {p.stem for p in NOTEBOOKS} <= set(CI_PARAMETERS)


def test_notebooks_are_stored_without_outputs():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, f'{path.name} has outputs'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  injected = nbformat.v4.new_code_cell(CI_PARAMETERS[path.stem].format(tmp=str(tmp_path / 'run')))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(index + 1, injected)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('PYTHONPATH', str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()
