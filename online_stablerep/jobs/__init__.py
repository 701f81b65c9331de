"""Jobs: the training job entry and the generator rank's loop."""
