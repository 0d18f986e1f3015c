"""Ahead-of-time artifacts: a model captured and compiled once (`fuselm build`), loaded by
any later process with no capture and no code generation (`fuselm.load`).

    fuselm build smollm2-135m -o smollm2.fuselm --target cpu      # or fuselm.artifact.build(...)
    model = fuselm.load("smollm2.fuselm")                         # called like the model
    llm = fuselm.LLM(model="smollm2.fuselm")                      # serves it

  format.py   the directory's layout and the manifest's keys
  codec.py    the JSON forms of the call signature and the result's structure (no pickle)
  weights.py  the weights file: safetensors, every tensor 64-byte aligned, memory-mapped
  machine.py  what the code needs of a machine (CPU features, a GPU), recorded and checked
  writer.py   writing each part into a staging directory, renamed into place when complete
  builder.py  `fuselm build`: load, compile, write (imports the compiler's frontend)
  verify.py   the checks before loading: format, versions, target, machine, sha256
  reader.py   `fuselm.load`: verify, parse graph.ir, map the weights, partition, load kernels

An artifact holds compiled code (shared libraries, Python modules) that loading runs:
load artifacts from trusted sources only. The sha256 in its manifest guards against
accidents (a truncated copy), not against someone who rewrites the manifest too.
"""
from ..lazy import lazy_attributes
from .format import is_artifact  # imports nothing heavy: the command line asks it before torch loads

__all__ = ["Artifact", "build", "is_artifact", "load"]
_LAZY = {"Artifact": "reader", "load": "reader", "build": "builder"}  # the builder imports the compiler's frontend


__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
