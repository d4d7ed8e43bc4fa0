"""lmms-eval tasks of this plugin (LMMS_EVAL_PLUGINS requires a `<plugin>.tasks` package).

Task YAML is not shipped here: `llava_synth/` holds the code, and `make-task` writes each
task's YAML next to its data (`python -m llava.integrations.lmms_eval make-task --help`).
"""
