"""The board side of edgeq (plus the host client in `client.py`).

Everything under `edgeq.agent` imports only the standard library, numpy, onnxruntime, LiteRT
(ai_edge_litert or tflite_runtime), psutil and edgeq's light modules (`errors`, `fileio`): it runs
on a board that has no torch. `client.py`, `host.py` and `bundles.py` run on the host.
"""
