"""The config files, installed as `structffn_jax.configs` (pyproject.toml maps this directory).

`common` holds what several files share: the paper's sizes, the data recipes, the small configs'
structures and the argument parser. A file is run by path: `--config configs/<file>.py:<arg>`.
"""
