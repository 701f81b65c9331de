"""Monitoring: metric sinks (TensorBoard, no-op), console lines, image grids."""
