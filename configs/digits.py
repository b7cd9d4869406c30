"""The main job: a small CNN on scikit-learn's 8x8 digits (ships with scikit-learn, no download).

python -m repjax.train --config configs/digits.py --workdir runs/digits
"""

from repjax import config as config_lib


def get_config(arg=None):
    del arg
    return config_lib.defaults()
