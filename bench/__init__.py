"""cellstream's benchmark harness: the service against in-process onnxruntime and the stateless alternative.

`python -m cellstream.bench` (or `cellstream bench`, `make bench`) runs every figure in one invocation: it starts
its own servers on 127.0.0.1 in separate processes, drives them from client processes, prints a table
and writes results.json and PNG plots. docs/BENCHMARKS.md explains each figure. No torch here.
"""
