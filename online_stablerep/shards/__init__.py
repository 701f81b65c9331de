"""Caption groups on disk as WebDataset tar shards: the format, and the background writer."""
