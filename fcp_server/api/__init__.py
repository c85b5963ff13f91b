"""HTTP adapters of the server, one Flask blueprint per API area: parse, call a service, reply.

`tasks` is the task-management API (the task builder's side), `devices` the device check-in /
report-result / upload API and `downloads` the plan and checkpoint downloads, as the ODP
Federated Compute services; `ops` serves health, readiness and Prometheus metrics.
"""
