"""Training side of cellstream: tokenizer, corpus, LSTM network, NumPy reference, training and ONNX export.

Only `tokenizer` and `corpus` are importable without torch.
"""
