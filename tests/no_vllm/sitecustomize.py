"""Make vLLM unimportable, as on a machine without its wheels (macOS, Windows): `make test-other-machine`.

Python imports this file at start-up when its folder is on PYTHONPATH, in the test process and in
every process it starts (notebook kernels, servers). A `None` in `sys.modules` is Python's own way
to block a module: `import vllm` then raises ModuleNotFoundError and
`importlib.util.find_spec("vllm")` returns None, as where vLLM is not installed.
"""

import sys

sys.modules["vllm"] = None
