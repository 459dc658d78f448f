"""The embedded synthetic world: generated facts, a word-level tokenizer and a tiny Llama pretrained on them.

This is the default `model` and `data` of both entry points: it needs no download and no GPU.
"""

from rledit.data.synthetic.accuracy import token_accuracy, world_accuracy
from rledit.data.synthetic.pretrain import DEFAULT_MODEL, PretrainConfig
from rledit.data.synthetic.tokenizer import build_tokenizer
from rledit.data.synthetic.world import Fact, SubjectSplit, World, WorldConfig, build_world
from rledit.data.synthetic.world_model import WorldModel, load_world_model

__all__ = [
    "DEFAULT_MODEL", "Fact", "PretrainConfig", "SubjectSplit", "World", "WorldConfig", "WorldModel",
    "build_tokenizer", "build_world", "load_world_model", "token_accuracy",
    "world_accuracy",
]
