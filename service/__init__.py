"""cellstream server: stateful LSTM inference over gRPC. Nothing here imports torch."""
