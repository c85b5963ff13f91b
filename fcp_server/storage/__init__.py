"""Persistence of the server: round state in SQL (`db`, `models`) and artifacts in blobs.

`blobs` holds plans, checkpoints, client updates and metrics behind the `BlobStore` interface
(`file://` on local disk, `gs://` in Google Cloud Storage via `blobs_gcs`), following the ODP
Federated Compute server's split between Spanner state and GCS artifacts.
"""
