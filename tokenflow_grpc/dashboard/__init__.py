"""`tokenflow dashboard`: a live terminal view of a TokenFlow server's figures
and activity (app), or one plain-text snapshot when stdout is not a terminal
(snapshot). The model contains what both show, and sources makes the calls.

The terminal view imports textual, so import tokenflow_grpc.dashboard.app
only where it runs."""
