"""The synthetic benchmark (`llava.data.synth`) as a local lmms-eval task; see `utils.py`."""
