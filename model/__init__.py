"""Training side of cellstream: tokenizer, corpus, LSTM network, NumPy reference, training and ONNX export.

Importable without torch (this file imports nothing): `tokenizer`, `languages`, `corpus`, `signal`, `parity`,
`reference`, `forecast_quality` and `evaluate`, and with onnx `onnx_file`, `onnx_adapt` and `glassbox`. The
others need the `train` extra.
"""
