"""Transport layers: thin servicers that convert protobuf to DataPlane calls and back."""
