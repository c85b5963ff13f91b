"""FCP task builder: a saved TFF FunctionalModel and a TaskConfig become validated plans.

The builder is the only part (with the simulated devices) that runs TensorFlow and TFF.
"""
