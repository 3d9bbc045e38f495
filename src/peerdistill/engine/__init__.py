"""Training: the one loop every method runs in, its building blocks (build, checkpoint, optimizer, precision,
processes) and the step benchmark."""
