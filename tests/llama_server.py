"""Run llama-cpp-python's server (``python -m llama_cpp.server ARGS``, the same
arguments) with llama.cpp's extra CPU buffer types turned off.

Why: on CPUs with AMX (Intel Sapphire Rapids and later, as this project's
machines have), llama.cpp repacks Q4_K weights into AMX buffers, and its AMX
matrix multiply crashes the server with a segmentation fault on the first
request (ggml-org/llama.cpp#20824, closed without a fix). llama-cpp-python has
no flag for the model parameter ``use_extra_bufts``, so this sets it off before
the server loads the model: the weights stay in plain CPU buffers (a little
slower, the same answers). Everything else is the stock server.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import llama_cpp.llama_cpp as native

_defaults = native.llama_model_default_params


def _without_extra_buffers() -> Any:
    params = _defaults()
    if hasattr(params, "use_extra_bufts"):  # older bindings lack it (and the crash)
        params.use_extra_bufts = False
    return params


native.llama_model_default_params = _without_extra_buffers

if __name__ == "__main__":
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
