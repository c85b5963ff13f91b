"""FCP server: device check-in, result upload, round lifecycle and DP-FedAvg aggregation.

The server never imports TensorFlow: plans and checkpoints are read as protobuf and
safetensors, and aggregation is numpy.
"""
