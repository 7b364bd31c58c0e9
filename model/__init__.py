"""Training side of cellstream: tokenizer, corpus, LSTM network, NumPy reference, training and ONNX export.

Only `tokenizer`, `corpus`, `signal` and `forecast_quality` (and `onnx_adapt`, with onnx) are importable
without torch.
"""
