"""Example models for the task builder: digits CNN, dense dict-feature model, EMNIST CNN."""
