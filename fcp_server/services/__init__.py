"""Use cases of the server, taking their session, blob store and clock as arguments.

Task management (`tasks`, `artifacts`), device check-in (`checkin`), report-result
(`reports`), uploads (`uploads`), the round lifecycle (`rounds`, `round_close`, `round_outputs`,
`maintenance`), evaluation checkpoint selection (`eval_selection`), DP budget bookkeeping
(`dp_budget`, over `fcp_server.accounting`) and device authentication (`auth`).
"""
