"""lmms-eval plugin: evaluate this package's pipeline with lmms-eval (`pip install "llava[lmms]"`).

The model `llava_pkg` (`models/llava_pkg.py:LlavaPkg`) is registered through lmms-eval's
entry-point group `lmms_eval.models` (declared in our pyproject, payload `manifests` below), so
an installed `llava` is found with no setting; lmms-eval's older plugin variable works too
(`LMMS_EVAL_PLUGINS=llava.integrations.lmms_eval` imports `<plugin>.models.AVAILABLE_MODELS`):

    # 1. a local task over the synthetic benchmark (questions + rendered images, no hub download)
    python -m llava.integrations.lmms_eval make-task data/synth --generate 280
    # 2. evaluate; --include_path is the folder step 1 printed
    lmms-eval --model llava_pkg \\
        --model_args pretrained=PATH,batch_size=8 --tasks llava_synth \\
        --include_path data/synth/lmms_eval_task --output_path results/

model_args: pretrained (default: the bundled tiny model), batch_size (wins over `--batch_size`),
conv_template or conv_mode, device, dtype, model_base, quantize. Any lmms-eval image task works
the same way (`--tasks mme`, ...). Why `--include_path` although the plugin has a `tasks`
package: lmms-eval 0.7.3 appends plugin task folders to the include path only after it has
built its task index, so they are never searched (and `--tasks path/to/task.yaml` is refused);
`tasks/` exists because the plugin lookup requires it.

lmms-eval's full dependency list is large (torchvision, wandb, opencv, ...); the `generate_until`
path of a local image task needs only `pip install --no-deps lmms-eval` plus loguru, sacrebleu,
evaluate (brings datasets), tenacity, pytablewriter and `filelock<4` (0.7.3 imports
`filelock._api`, which filelock 4 removed).
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "llava_pkg"
CLASS_PATH = "llava.integrations.lmms_eval.models.llava_pkg.LlavaPkg"


def manifests() -> list[Any]:
    """The `lmms_eval.models` entry-point payload: one manifest for `llava_pkg`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]
