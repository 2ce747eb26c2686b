"""edgeq: quantize a network, export exact INT8/INT4 ONNX and TFLite, check and profile it on edge boards.

Importing the package must stay cheap: no torch here, so the board agent can use `edgeq.agent`
with only numpy and a runtime installed.
"""

__version__ = "0.1.0"
