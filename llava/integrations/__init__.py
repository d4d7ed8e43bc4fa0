"""Adapters that plug this package into other projects' tools (each in its own subpackage).

- `llava.integrations.lmms_eval`: our pipeline as an lmms-eval model (`llava_pkg`), and a local
  lmms-eval task over the synthetic benchmark (`llava_synth`).

Nothing here is imported by `llava` itself, so the other tools stay optional dependencies.
"""
