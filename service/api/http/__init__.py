"""The HTTP face (KServe v2 REST, sessions as JSON with streamed replies): a thin transport over the same
servicer cores and DataPlane as gRPC. See app.py for the wiring."""
