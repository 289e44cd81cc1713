"""The operator's view in a browser: the dashboard (served by the daemon) and the charts
the period report shares with it."""
