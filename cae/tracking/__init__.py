"""MLflow and TensorBoard tracking of trainings, and comparisons of tracked runs."""
