"""Datasets the project makes itself: the synthetic shapes-and-words world (`llava.data.synth`).

No pretrained weights or datasets can be downloaded where this project is built, so a tiny
LLaVA is trained and evaluated on generated scenes with known answers.
"""

from llava.data.synth import generate
from llava.data.synth_scene import Obj, Scene, render, sample_scene

__all__ = ["generate", "Scene", "Obj", "render", "sample_scene"]
