"""Training: one loop; objectives and callbacks are the extension points."""
