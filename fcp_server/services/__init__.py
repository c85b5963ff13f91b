"""Use cases of the server, taking their session, blob store and clock as arguments.

Task management (`tasks`, `artifacts`), device check-in (`checkin`), report-result
(`reports`), uploads (`uploads`), the round lifecycle (`rounds`, `round_close`, `maintenance`),
privacy accounting (`privacy_budget`) and device authentication (`auth`).
"""
