"""Running cells and grids, the artifact store, leaderboards and reports."""
