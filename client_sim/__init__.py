"""Simulated device fleet: real device behaviour over HTTP, running TFLite plans."""
